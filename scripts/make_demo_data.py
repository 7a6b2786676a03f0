"""Generate the demo data set (data/demo/*.jsonl): customer-support tickets routed to billing, technical or
shipping. Written for lora-exp (no third-party text; same licence as the repo). Validation rows use
products, phrasings and details that never appear in training, so a good score means generalisation.

    python scripts/make_demo_data.py   # rewrites data/demo/train.jsonl and data/demo/validation.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OPENERS = ["Hi,", "Hello,", "Hey team,", "Good morning,", "Dear support,", "", "Quick question:", "Urgent:"]
CLOSERS = ["Thanks.", "Please help.", "Thank you!", "", "Regards.", "Can you look into it?", "Any update?"]

TRAIN = {
    "billing": [
        "I was charged twice for my {p} subscription this month.",
        "My invoice for the {p} shows the wrong amount.",
        "Please refund the payment I made for the {p}.",
        "Why did my credit card get billed again for the {p}?",
        "I want to cancel the automatic renewal and get my money back for the {p}.",
        "The discount code was not applied to my {p} order total.",
    ],
    "technical": [
        "The {p} app crashes every time I open it.",
        "I cannot log in to my {p} account, it says error 500.",
        "The {p} keeps disconnecting from the wifi.",
        "After the latest update the {p} screen stays black.",
        "The {p} software freezes when I try to save a file.",
        "Bluetooth pairing with the {p} fails with an unknown error.",
    ],
    "shipping": [
        "My {p} order has not arrived yet and tracking shows no movement.",
        "The courier delivered my {p} to the wrong address.",
        "The {p} package arrived damaged and the box was crushed.",
        "When will my {p} be shipped? It has been a week.",
        "The tracking number for my {p} delivery does not work.",
        "I need to change the delivery address for my {p} parcel.",
    ],
}
HELD_OUT = {
    "billing": [
        "There is an unexpected fee on my bank statement for the {p}.",
        "You took payment for the {p} but my plan was already paid.",
        "I need a copy of the receipt, the {p} price looks too high.",
    ],
    "technical": [
        "The {p} shows a blank page and then reboots itself.",
        "Installing the {p} driver stops halfway with a crash report.",
        "The {p} battery status is wrong and the firmware will not update.",
    ],
    "shipping": [
        "The parcel with my {p} is stuck at the depot for days.",
        "The delivery driver never came with my {p}, nobody rang the bell.",
        "My {p} was returned to the warehouse instead of being delivered.",
    ],
}
TRAIN_PRODUCTS = ["laptop", "phone", "headphones", "smart watch", "router", "printer", "tablet", "camera",
                  "speaker", "monitor", "keyboard", "game console"]
HELD_OUT_PRODUCTS = ["e-reader", "drone", "vacuum robot", "projector", "fitness tracker"]


def make(templates: dict[str, list[str]], products: list[str], n: int, rng: random.Random) -> list[dict]:
    rows = []
    labels = sorted(templates)
    for i in range(n):
        label = labels[i % len(labels)]
        body = rng.choice(templates[label]).format(p=rng.choice(products))
        text = " ".join(x for x in (rng.choice(OPENERS), body, rng.choice(CLOSERS)) if x)
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    for name, rows in {"train": make(TRAIN, TRAIN_PRODUCTS, 240, rng),
                       "validation": make(HELD_OUT, HELD_OUT_PRODUCTS, 90, rng)}.items():
        with (out / f"{name}.jsonl").open("w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"wrote {len(rows)} rows to {out / name}.jsonl")


if __name__ == "__main__":
    main()
