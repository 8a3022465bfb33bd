"""Regenerate the order-extraction chats (deterministic, offline, standard library only).

    python examples/data/make_orders.py

Each chat asks for the order in a free-text customer message as one compact JSON
object with the keys item, quantity, color, city and deadline (null where the message
does not say). Messages vary in phrasing, order of the parts, typos, case, numbers as
digits or words and distractor numbers (order refs, room numbers). The test file mixes
in phrasings and cities the training file never uses, so a fine-tuned model has to
extract rather than recall.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

HERE = Path(__file__).parent
SYSTEM = (
    "Extract the order as JSON with keys item, quantity, color, city, deadline. "
    "Use null for anything not stated."
)
N_TRAIN, N_TEST = 320, 60

# item (canonical, singular) -> plural as a customer writes it
ITEMS = {
    "mug": "mugs",
    "t-shirt": "t-shirts",
    "notebook": "notebooks",
    "backpack": "backpacks",
    "lamp": "lamps",
    "umbrella": "umbrellas",
    "candle": "candles",
    "poster": "posters",
    "scarf": "scarves",
    "cap": "caps",
    "pillow": "pillows",
    "tote bag": "tote bags",
    "water bottle": "water bottles",
    "phone case": "phone cases",
    "hoodie": "hoodies",
    "blanket": "blankets",
    "keychain": "keychains",
    "plant pot": "plant pots",
}
COLORS = ["red", "blue", "green", "black", "white", "yellow", "grey", "pink", "purple"]
COLORS += ["orange", "navy", "brown", "beige"]
CITIES = ["Oslo", "Bergen", "Lisbon", "Porto", "Berlin", "Hamburg", "Madrid", "Lyon"]
CITIES += ["Paris", "Dublin", "Vienna", "Prague", "Milan", "Leeds", "Austin", "Denver"]
CITIES += ["Toronto", "Gothenburg", "Utrecht", "Seville"]
TEST_CITIES = ["Tromso", "Graz", "Bilbao", "Krakow", "Malmo", "Cork"]  # never in training
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August"]
MONTHS += ["September", "October", "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight"]
NUMBER_WORDS += ["nine", "ten", "eleven", "twelve"]
NAMES = ["Kari", "Tom", "Aisha", "Lena", "Marco", "Priya", "Jon", "Sofia", "Ben", "Yuki"]
# filler word -> how people type it in a hurry
TYPOS = {
    "please": ["pls", "plz", "pleas"],
    "you": ["u", "yu"],
    "thanks": ["thx", "ty", "thnks"],
    "could": ["cud", "coud"],
    "would": ["wud", "woud"],
    "hello": ["helo", "hllo"],
    "tomorrow": ["tmrw", "tomorow"],
}


@dataclass(frozen=True)
class Order:
    """What the message states; None for a field it leaves out."""

    item: str
    quantity: int | None
    color: str | None
    city: str | None
    deadline: str | None

    def answer(self) -> str:
        """The assistant's reply: one compact JSON object, keys in a fixed order."""
        return json.dumps(
            {
                "item": self.item,
                "quantity": self.quantity,
                "color": self.color,
                "city": self.city,
                "deadline": self.deadline,
            }
        )


def draw_order(rng: random.Random, cities: list[str]) -> Order:
    """A random order; each field but the item is missing one time in four."""

    def maybe(value: T) -> T | None:
        return None if rng.random() < 0.25 else value

    date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}"
    return Order(
        item=rng.choice(list(ITEMS)),
        quantity=maybe(rng.choice([1, 1, 2, 2, 3, 4, 5, 6, 8, 10, 12, rng.randint(2, 40)])),
        color=maybe(rng.choice(COLORS)),
        city=maybe(rng.choice(cities)),
        deadline=maybe(rng.choice([*WEEKDAYS, *WEEKDAYS, "tomorrow", "next week", date])),
    )


# ---- phrases for one field each -------------------------------------------------


def goods(rng: random.Random, o: Order) -> str:
    """Quantity, colour and item: '3 blue mugs', 'an orange lamp', 'mugs in blue', 'some caps'."""
    noun = o.item if o.quantity == 1 else ITEMS[o.item]
    if o.color is not None and rng.random() < 0.25:
        noun = f"{noun} in {o.color}"
    elif o.color is not None:
        noun = f"{o.color} {noun}"
    if o.quantity is None:
        count = rng.choice(["some", "a few", "a batch of", ""])
    elif o.quantity == 1:
        count = rng.choice(["one", "1", "an" if noun[0] in "aeiou" else "a"])
    elif o.quantity == 12 and rng.random() < 0.3:
        count = "a dozen"
    elif o.quantity == 2 and rng.random() < 0.3:
        count = "a pair of"
    elif o.quantity <= 12 and rng.random() < 0.5:
        count = NUMBER_WORDS[o.quantity]
    else:
        count = str(o.quantity)
    return f"{count} {noun}".strip()


def place(rng: random.Random, city: str) -> str:
    """Where to: 'to Oslo', 'for our Oslo office', ..."""
    forms = ["to {c}", "to {c}", "to our office in {c}", "for our {c} store", "delivered to {c}"]
    forms += ["shipped to {c}", "over to {c}"]
    return rng.choice(forms).format(c=city)


def when(rng: random.Random, deadline: str) -> str:
    """The deadline as written: 'friday', 'Fri', 'tmrw' (via typos), 'next week', '3 March'."""
    if deadline in WEEKDAYS:
        return rng.choice([deadline, deadline.lower(), deadline[:3].lower(), deadline[:3]])
    if deadline in ("tomorrow", "next week"):
        return deadline
    month, day = deadline.split()
    return rng.choice([f"{month} {day}", f"{day} {month}", f"{month[:3]} {day}"])


def due(rng: random.Random, deadline: str) -> str:
    """By when: 'by friday', 'before Fri', 'sometime next week', 'by March 3'."""
    if deadline == "tomorrow":
        return rng.choice(["by tomorrow", "tomorrow if possible", "for tomorrow"])
    if deadline == "next week":
        return rng.choice(["sometime next week", "by next week", "next week"])
    form = rng.choice(["by {w}", "before {w}", "no later than {w}", "by {w} latest"])
    return form.format(w=when(rng, deadline))


def distractor(rng: random.Random) -> str:
    """A clause that holds a number or a name but no order field."""
    return rng.choice(
        [
            f"order #{rng.randint(1000, 9999)}.",
            f"(ref {rng.randint(100, 999)})",
            f"I'm in room {rng.randint(2, 60)}.",
            "love your shop!",
            "my sister recommended you.",
            f"call me on ext {rng.randint(100, 999)} if needed.",
            "",
            "",
        ]
    )


def greet(rng: random.Random) -> str:
    return rng.choice(["hi! ", "hello, ", "Hey, ", "Hi there, ", "good morning! ", "", ""])


def sign(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    return rng.choice([f" thanks, {name}", f" thx, {name}", f" - {name}", " cheers", "", ""])


def tail(rng: random.Random, o: Order) -> str:
    """Place and deadline in either order ('' for missing fields)."""
    parts = [place(rng, o.city) if o.city else "", due(rng, o.deadline) if o.deadline else ""]
    rng.shuffle(parts)
    return " ".join(p for p in parts if p)


# ---- whole messages: training phrasings ------------------------------------------


def ask_send(rng: random.Random, o: Order) -> str:
    verb = rng.choice(["could you send", "can you ship", "please send", "would you send"])
    return f"{greet(rng)}{verb} {goods(rng, o)} {tail(rng, o)}? {distractor(rng)}{sign(rng)}"


def want(rng: random.Random, o: Order) -> str:
    verb = rng.choice(["I'd like to order", "I want", "we need", "I would like", "we'd like"])
    return f"{greet(rng)}{verb} {goods(rng, o)} {tail(rng, o)}. {distractor(rng)}{sign(rng)}"


def terse(rng: random.Random, o: Order) -> str:
    return f"{goods(rng, o)} {tail(rng, o)} {rng.choice(['please', 'pls', 'asap', ''])}"


def two_sentences(rng: random.Random, o: Order) -> str:
    first = f"{greet(rng)}I need {goods(rng, o)}."
    rest = []
    if o.city:
        rest.append(rng.choice(["Ship to {c}.", "Address is in {c}.", "Send them to {c}."]))
    if o.deadline:
        rest.append(f"Need it {due(rng, o.deadline)}.")
    rng.shuffle(rest)
    text = " ".join([first, *rest]).format(c=o.city)
    return f"{text} {distractor(rng)}{sign(rng)}"


def company(rng: random.Random, o: Order) -> str:
    firm = rng.choice(["Acme", "Nordlys", "Bluebird", "Kestrel"])
    who = f"this is {rng.choice(NAMES)} from {firm}"
    return f"Hello, {who}. We would like {goods(rng, o)} {tail(rng, o)}. Thanks"


def deadline_first(rng: random.Random, o: Order) -> str:
    lead = due(rng, o.deadline).capitalize() + ", " if o.deadline else ""
    where = f" {place(rng, o.city)}" if o.city else ""
    return f"{lead}I need {goods(rng, o)}{where}. {distractor(rng)}{sign(rng)}"


# ---- whole messages: only in the test file ---------------------------------------


def key_values(rng: random.Random, o: Order) -> str:
    """'item: mugs, qty: 3, colour: blue, ship to: Oslo, due: friday'."""
    fields = [f"item: {ITEMS[o.item] if o.quantity != 1 else o.item}"]
    if o.quantity is not None:
        fields.append(f"qty: {o.quantity}")
    if o.color:
        fields.append(f"colour: {o.color}")
    if o.city:
        fields.append(f"ship to: {o.city}")
    if o.deadline:
        fields.append(f"due: {when(rng, o.deadline)}")
    return f"new order - {', '.join(fields)}"


def question(rng: random.Random, o: Order) -> str:
    """'do you have blue mugs? I'd take 3, to Oslo by friday'."""
    shade = f"{o.color} " if o.color else ""
    count = f" I'd take {o.quantity}," if o.quantity is not None else " I'd take some,"
    return f"do you have {shade}{ITEMS[o.item]}?{count} {tail(rng, o)}{sign(rng)}"


def city_first(rng: random.Random, o: Order) -> str:
    """'For our Oslo team: 3 blue mugs by friday, cheers'."""
    where = f"For our {o.city} team: " if o.city else "For the team: "
    when = f" {due(rng, o.deadline)}" if o.deadline else ""
    return f"{where}{goods(rng, o)}{when}{sign(rng)}"


TRAIN_STYLES: list[Callable[[random.Random, Order], str]] = [
    ask_send,
    want,
    terse,
    two_sentences,
    company,
    deadline_first,
]
TEST_STYLES: list[Callable[[random.Random, Order], str]] = [key_values, question, city_first]


def roughen(rng: random.Random, text: str) -> str:
    """Typos in filler words, sometimes all lower case; single spaces, none before
    punctuation (left where an optional part was empty)."""
    words = []
    for word in text.split():
        bare = word.lower().strip(",.!?")
        if bare in TYPOS and rng.random() < 0.35:
            word = word.lower().replace(bare, rng.choice(TYPOS[bare]))
        words.append(word)
    out = re.sub(r" (?=[.?!,])", "", " ".join(words))
    return out.lower() if rng.random() < 0.2 else out


def chat(user: str, order: Order) -> dict[str, list[dict[str, str]]]:
    """One chat in OpenAI's format."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {"role": "assistant", "content": order.answer()},
        ]
    }


def draw_chats(
    rng: random.Random,
    n: int,
    styles: Callable[[], Callable[[random.Random, Order], str]],
    cities: Callable[[], list[str]],
    seen: set[str],
) -> list[dict[str, list[dict[str, str]]]]:
    """``n`` chats whose user messages are all new (added to ``seen``)."""
    out: list[dict[str, list[dict[str, str]]]] = []
    while len(out) < n:
        order = draw_order(rng, cities())
        user = roughen(rng, styles()(rng, order))
        if user not in seen:
            seen.add(user)
            out.append(chat(user, order))
    return out


def write_jsonl(path: Path, rows: list[dict[str, list[dict[str, str]]]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    rng = random.Random(13)  # noqa: S311 - a reproducible data set, not a secret
    seen: set[str] = set()
    train = draw_chats(rng, N_TRAIN, lambda: rng.choice(TRAIN_STYLES), lambda: CITIES, seen)
    # Half the test chats use phrasings never trained on; a third of all ship to new cities.
    test = draw_chats(
        rng,
        N_TEST,
        lambda: rng.choice(TEST_STYLES if rng.random() < 0.5 else TRAIN_STYLES),
        lambda: TEST_CITIES if rng.random() < 0.33 else CITIES,
        seen,
    )
    write_jsonl(HERE / "orders-train.jsonl", train)
    write_jsonl(HERE / "orders-test.jsonl", test)


if __name__ == "__main__":
    main()
