{{/*
Names and labels.
*/}}
{{- define "lora-exp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fullname, kept short (40) so "<fullname>-<run>-r<revision>" still fits a DNS label with room for
the "-<index>" an Indexed Job appends to pod hostnames.
*/}}
{{- define "lora-exp.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lora-exp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lora-exp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-exp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lora-exp.labels" -}}
helm.sh/chart: {{ include "lora-exp.chart" . }}
{{ include "lora-exp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lora-exp
{{- end }}

{{/* A label value / DNS label from any string: lower case, [a-z0-9-], trimmed. */}}
{{- define "lora-exp.slug" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (. | toString | lower) "-" | trunc 63 | trimAll "-" }}
{{- end }}

{{- define "lora-exp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-exp.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Name of the immutable ConfigMap holding this revision's experiment spec. */}}
{{- define "lora-exp.specConfigMap" -}}
{{- printf "%s-spec-r%d" (include "lora-exp.fullname" .) (int .Release.Revision) }}
{{- end }}

{{/*
Image reference: repository:tag[@digest]. Argument: dict "image" <values.image> "tag" <default tag>.
*/}}
{{- define "lora-exp.imageRef" -}}
{{- $tag := .image.tag | default .tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The runs to launch, as JSON {"experiment": ..., "runs": [...], "profiles": [...]}. Each run:
name (as in the spec), slug, specKey (its file in the spec ConfigMap), jobName, profile, job (train|eval),
gpus, nodes, multiNode, torchrun, image.
Fails with a readable message on a missing experiment, an unknown run or profile, or two runs whose
Job names would collide.
*/}}
{{- define "lora-exp.context" -}}
{{- $exp := .Values.experiment }}
{{- if not $exp }}
{{- fail "no experiment: pass a values file with an `experiment:` section, e.g. helm install mnli charts/ -f values/mnli.yaml" }}
{{- end }}
{{- if not $exp.runs }}
{{- fail "experiment.runs is empty: a values file needs at least one run" }}
{{- end }}
{{- $fullname := include "lora-exp.fullname" . }}
{{- $defaults := $exp.defaults | default dict }}
{{- $selected := .Values.job.runs | default (keys $exp.runs | sortAlpha) }}
{{- $runs := list }}
{{- $profilesUsed := list }}
{{- $jobNames := dict }}
{{- range $name := $selected }}
{{- if not (hasKey $exp.runs $name) }}
{{- fail (printf "job.runs names %q, which is not a run of experiment.runs (%s)" $name (keys $exp.runs | sortAlpha | join ", ")) }}
{{- end }}
{{- $run := index $exp.runs $name | default dict }}
{{- $profileName := index $.Values.job.runProfiles $name | default $.Values.profile }}
{{- if eq $profileName "auto" }}
{{- fail (printf "profile auto (run %q) is chosen before install: lora-exp plan -f <values> --auto profiles.yaml, then helm install ... -f <values> -f profiles.yaml (README: Sizing runs)" $name) }}
{{- end }}
{{- if not (hasKey $.Values.profiles $profileName) }}
{{- fail (printf "profile %q (run %q) is not defined under profiles; known: %s" $profileName $name (keys $.Values.profiles | sortAlpha | join ", ")) }}
{{- end }}
{{- $p := index $.Values.profiles $profileName }}
{{- $baseSlug := include "lora-exp.slug" $name }}
{{- if not $baseSlug }}
{{- fail (printf "run name %q has no letter or digit to name a Job with" $name) }}
{{- end }}
{{- /* A run with repeats/seeds is one Job per seed (lora-exp names them <run>/seed-<seed>); the spec
(validated by lora-exp itself in the validate init container) decides: the run's own keys over defaults. */}}
{{- $merged := mergeOverwrite (deepCopy $defaults) (deepCopy $run) }}
{{- $seeds := list "" }}
{{- if $merged.seeds }}
{{- $seeds = $merged.seeds }}
{{- else if $merged.repeats }}
{{- $training := $merged.training | default dict }}
{{- $base := int (ternary $training.seed 42 (hasKey $training "seed")) }}
{{- $seeds = list }}
{{- range $i := until (int $merged.repeats) }}
{{- $seeds = append $seeds (add $base $i) }}
{{- end }}
{{- end }}
{{- range $seed := $seeds }}
{{- $runName := ternary $name (printf "%s/seed-%v" $name $seed) (eq (toString $seed) "") }}
{{- $slug := ternary $baseSlug (printf "%s-seed-%v" $baseSlug $seed) (eq (toString $seed) "") }}
{{- $jobName := printf "%s-%s" $fullname $slug | trunc 50 | trimSuffix "-" }}
{{- $jobName = printf "%s-r%d" $jobName (int $.Release.Revision) }}
{{- if hasKey $jobNames $jobName }}
{{- fail (printf "runs %q and %q both map to the Job name %q: rename one" (index $jobNames $jobName) $runName $jobName) }}
{{- end }}
{{- $_ := set $jobNames $jobName $runName }}
{{- $job := $run.job | default $defaults.job | default "train" }}
{{- $gpus := int ($p.gpus | default 0) }}
{{- $nodes := int ($p.nodes | default 1) }}
{{- $variant := ternary "cuda" "cpu" (gt $gpus 0) }}
{{- $image := include "lora-exp.imageRef" (dict "image" $.Values.image "tag" (printf "%s-%s" $.Chart.AppVersion $variant)) }}
{{- $workers := 0 }}
{{- if $merged.sweep }}
{{- /* A sweep: an Indexed Job whose pods are the study's workers, one process each. */}}
{{- if or (gt $gpus 1) (gt $nodes 1) }}
{{- fail (printf "run %q is a sweep: its trials run one process each, so its profile %q must have at most one GPU and one node" $name $profileName) }}
{{- end }}
{{- $workers = int ($merged.sweep.workers | default 2) }}
{{- end }}
{{- $runs = append $runs (dict "name" $runName "base" $name "seed" (toString $seed) "slug" $slug "specKey" (printf "%s.yaml" $slug) "jobName" $jobName "profile" $profileName "job" $job "gpus" $gpus "nodes" $nodes "multiNode" (gt $nodes 1) "torchrun" (or (gt $gpus 1) (gt $nodes 1)) "image" $image "workers" $workers) }}
{{- end }}
{{- if not (has $profileName $profilesUsed) }}
{{- $profilesUsed = append $profilesUsed $profileName }}
{{- end }}
{{- end }}
{{- dict "experiment" $exp.name "runs" $runs "profiles" ($profilesUsed | sortAlpha) | toJson }}
{{- end }}

{{/*
The spec file of one run (ConfigMap key <slug>.yaml): the values file's experiment section holding only
that run, with the run's profile's training defaults layered UNDER experiment.defaults.training (key by
key, so an explicit false/0 in the experiment still wins; the run's own fields override defaults when
lora-exp merges them). One run per file means the command needs no --run, which torchrun's launcher
could not pass through (it would read --run as an abbreviation of its own --run-path).
Emitted as JSON, which is YAML: numbers such as 3e-05 keep their type (toYaml writes 3e-05, which YAML
1.1 readers take for a string). Argument: dict "root" $ "profile" <name> "run" <run key> "seed" <seed of one
repeat, or "">.
*/}}
{{- define "lora-exp.specFile" -}}
{{- $exp := deepCopy .root.Values.experiment }}
{{- $p := index .root.Values.profiles .profile }}
{{- $defaults := $exp.defaults | default dict }}
{{- $training := deepCopy ($p.training | default dict) }}
{{- range $k, $v := ($defaults.training | default dict) }}
{{- $_ := set $training $k $v }}
{{- end }}
{{- $_ := set $defaults "training" $training }}
{{- $run := deepCopy (index $exp.runs .run | default dict) }}
{{- if .seed }}
{{- /* One repeat: the file's run repeats with exactly this seed (lora-exp names it <run>/seed-<seed>). */}}
{{- $_ := unset $defaults "repeats" }}
{{- $_ := unset $defaults "seeds" }}
{{- $_ := unset $run "repeats" }}
{{- $_ := set $run "seeds" (list (int .seed)) }}
{{- end }}
{{- $_ := set $exp "defaults" $defaults }}
{{- $_ := set $exp "runs" (dict .run $run) }}
{{- printf "# lora-exp spec of run %q on profile %s (its training defaults are layered under experiment.defaults.training).\n" (ternary (printf "%s/seed-%s" .run .seed) .run (ne .seed "")) .profile }}
{{- dict "experiment" $exp | toPrettyJson }}
{{- end }}

{{/* The in-chart MLflow service name and the tracking URI the Jobs get. */}}
{{- define "lora-exp.mlflowName" -}}
{{- printf "%s-mlflow" (include "lora-exp.fullname" .) }}
{{- end }}

{{- define "lora-exp.postgresqlName" -}}
{{- printf "%s-postgresql" (include "lora-exp.fullname" .) }}
{{- end }}

{{- define "lora-exp.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "lora-exp.mlflowName" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- else if .Values.mlflow.trackingUri }}
{{- .Values.mlflow.trackingUri }}
{{- else }}
{{- /* Embedded store on the outputs volume (lora-exp keeps the artifacts beside it, in mlartifacts/).
MLflow 3 refuses new file:// stores; sqlite suits one run at a time, not many Jobs on a network volume. */}}
{{- printf "sqlite:///%s/mlflow.db" .Values.persistence.outputs.mountPath }}
{{- end }}
{{- end }}

{{/* Secret holding the Jobs' MLflow credentials, or "" when they log anonymously. */}}
{{- define "lora-exp.trackingSecret" -}}
{{- if .Values.mlflow.tracking.existingSecret }}
{{- .Values.mlflow.tracking.existingSecret }}
{{- else if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}
{{- .Values.mlflow.auth.existingSecret }}
{{- end }}
{{- end }}

{{- define "lora-exp.bundledPostgresql" -}}
{{- if and .Values.mlflow.enabled (not .Values.mlflow.backendStore.existingSecret) }}true{{ end }}
{{- end }}

{{/* Pod Security "restricted" settings, shared by every pod of the chart. Argument: the uid/gid dict. */}}
{{- define "lora-exp.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ int .runAsUser }}
runAsGroup: {{ int .runAsGroup }}
fsGroup: {{ int .fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "lora-exp.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
