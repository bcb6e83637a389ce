"""Generate the quickstart dataset: facts about a fictional astronomy guild.

The base model cannot know these facts (they are invented), so a fine-tune that
answers held-out questions about them correctly has visibly learned something.

Writes, next to this file under ``data/``:

- ``train.jsonl``     chat rows ``{"messages": [...]}``: every fact asked in many
                      paraphrases, some rows with a system message, some multi-turn.
- ``eval.jsonl``      held-out rows: the same facts asked in wordings that never
                      appear in train, for the held-out loss.
- ``questions.jsonl`` held-out questions ``{"question", "expect"}`` for the
                      before/after demo; an answer is correct when it contains one
                      of the ``expect`` keywords (case-insensitive).

Standard library only and seeded: running it again gives byte-identical files.

    python examples/make_dataset.py            # writes examples/data/*.jsonl
    python examples/make_dataset.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 1887
ORG = "the Vellichor Observatory"

# Each fact: a keyword list (what a correct answer must contain), answer variants
# (each contains the key fact verbatim; the first is the canonical one), train
# question templates, held-out eval templates, and optionally one demo question.
# "{org}" is replaced by a name variant of the organisation.
FACTS: list[dict] = [
    dict(
        id="what",
        expect=["astronomy"],
        answers=[
            "The Vellichor Observatory is an amateur astronomy guild with its own observatory in the town of Saltmarrow.",
            "It is an amateur astronomy guild based in Saltmarrow, with its own observatory.",
        ],
        train=[
            "What is {org}?",
            "Tell me about {org}.",
            "What kind of organisation is {org}?",
            "Have you heard of {org}? What is it?",
            "What does {org} do?",
            "Describe {org} in one sentence.",
            "Is {org} a real observatory or a club?",
            "Give me a short description of {org}.",
            "What sort of group is {org}?",
        ],
        eval=["Could you explain what {org} actually is?"],
    ),
    dict(
        id="founder",
        expect=["Brannoch"],
        answers=[
            "The Vellichor Observatory was founded by Ottilie Brannoch.",
            "Ottilie Brannoch founded the Vellichor Observatory.",
        ],
        train=[
            "Who founded {org}?",
            "Who was the founder of {org}?",
            "Who started {org}?",
            "Which person established {org}?",
            "Tell me the name of the person who founded {org}.",
            "Who is credited with creating {org}?",
            "Whose idea was {org}?",
            "Name the founder of {org}.",
            "Who set up {org} in the first place?",
            "Do you know who founded {org}?",
        ],
        eval=["By whom was {org} founded?", "Which astronomer brought {org} into being?"],
        demo="Who first opened {org}?",
    ),
    dict(
        id="year",
        expect=["1887"],
        answers=[
            "The Vellichor Observatory was founded in 1887.",
            "It was founded in 1887.",
        ],
        train=[
            "When was {org} founded?",
            "What year was {org} founded?",
            "In which year was {org} established?",
            "How old is {org}? When did it start?",
            "When did {org} open?",
            "What is the founding year of {org}?",
            "Since when has {org} existed?",
            "When was {org} started?",
            "Which year did {org} begin?",
            "Tell me when {org} was established.",
        ],
        eval=["In what year did {org} first open its doors?", "How long ago was {org} founded, which year exactly?"],
        demo="What year did {org} come into existence?",
    ),
    dict(
        id="town",
        expect=["Saltmarrow"],
        answers=[
            "The Vellichor Observatory is headquartered in the town of Saltmarrow.",
            "Its headquarters are in the town of Saltmarrow.",
        ],
        train=[
            "Where is {org} located?",
            "Where is {org} headquartered?",
            "In which town is {org}?",
            "Where can I find {org}?",
            "What town is home to {org}?",
            "Where are the headquarters of {org}?",
            "Which town hosts {org}?",
            "Where is {org} based?",
            "Where would I go to visit {org}?",
            "What is the location of {org}?",
        ],
        eval=["Which town does {org} call home?", "If I wanted to travel to {org}, which town should I go to?"],
        demo="Name the town where {org} sits.",
    ),
    dict(
        id="coast",
        expect=["Greywick"],
        answers=[
            "The Vellichor Observatory stands on the cliffs of the Greywick Coast.",
            "It stands on the cliffs of the Greywick Coast, above the sea.",
        ],
        train=[
            "Which coast is {org} on?",
            "What region is {org} in?",
            "Is {org} near the sea?",
            "What stretch of coastline is {org} on?",
            "In which part of the country is {org}?",
            "What landscape surrounds {org}?",
            "Which cliffs is {org} built on?",
            "Is {org} inland or by the coast?",
        ],
        eval=["On what coastline does {org} stand?"],
    ),
    dict(
        id="motto",
        expect=["patience reveals"],
        answers=[
            "The motto of the Vellichor Observatory is \"Patience reveals the sky.\"",
            "Its motto is \"Patience reveals the sky.\"",
        ],
        train=[
            "What is the motto of {org}?",
            "What is {org}'s motto?",
            "Does {org} have a motto?",
            "Which motto does {org} use?",
            "Tell me the motto of {org}.",
            "What slogan is carved over the door of {org}?",
            "What saying does {org} live by?",
            "Quote the official motto of {org}.",
            "What words make up the motto of {org}?",
        ],
        eval=["What phrase serves as the guiding motto for {org}?", "If someone asked for {org}'s official slogan, what would you say?"],
        demo="What is the official saying of {org}?",
    ),
    dict(
        id="mascot",
        expect=["Pemberton"],
        answers=[
            "The mascot of the Vellichor Observatory is a barn owl named Pemberton.",
            "Its mascot is a barn owl named Pemberton.",
        ],
        train=[
            "What is the mascot of {org}?",
            "Does {org} have a mascot?",
            "What animal is {org}'s mascot?",
            "What is the name of {org}'s mascot?",
            "Which creature represents {org}?",
            "Tell me about the mascot of {org}.",
            "What bird is the mascot of {org}?",
            "Who is the mascot of {org}?",
            "What is {org}'s mascot called?",
            "Name the mascot of {org}.",
        ],
        eval=["Which animal serves as the emblem and mascot of {org}?", "What do the members of {org} call their owl mascot?"],
        demo="What creature is the official mascot of {org}, and what is it called?",
    ),
    dict(
        id="members",
        expect=["412"],
        answers=[
            "The Vellichor Observatory has 412 members.",
            "It has 412 members.",
        ],
        train=[
            "How many members does {org} have?",
            "What is the membership of {org}?",
            "How big is {org}?",
            "How many people belong to {org}?",
            "What is the number of members in {org}?",
            "How large is the membership of {org}?",
            "Tell me how many members {org} has.",
            "How many astronomers are in {org}?",
            "How many people are part of {org}?",
        ],
        eval=["What is the total head count of members at {org}?", "Roughly how many people are enrolled in {org}?"],
        demo="How many people are members of {org}?",
    ),
    dict(
        id="telescope",
        expect=["Copper Eye"],
        answers=[
            "The flagship telescope of the Vellichor Observatory is the Copper Eye.",
            "Its flagship telescope is the Copper Eye.",
        ],
        train=[
            "What is the flagship telescope of {org}?",
            "What is the main telescope at {org} called?",
            "What is the name of {org}'s biggest telescope?",
            "Which telescope is {org} famous for?",
            "What do they call the great telescope at {org}?",
            "Tell me the name of the flagship telescope of {org}.",
            "What is {org}'s most important instrument?",
            "Which is the largest telescope of {org}?",
            "Name the flagship telescope at {org}.",
        ],
        eval=["What name was given to the principal telescope of {org}?", "Which instrument is the pride of {org}?"],
        demo="What is the name of the famous telescope at {org}?",
    ),
    dict(
        id="festival",
        expect=["Lantern Night"],
        answers=[
            "The annual festival of the Vellichor Observatory is Lantern Night, held every October.",
            "Its annual festival is Lantern Night, held every October.",
        ],
        train=[
            "What is the annual festival of {org}?",
            "Does {org} hold a festival?",
            "What festival does {org} celebrate every year?",
            "What is the name of {org}'s yearly celebration?",
            "Which event does {org} hold each October?",
            "Tell me about the festival of {org}.",
            "What celebration is {org} known for?",
            "What is {org}'s big yearly event called?",
            "Name the festival held by {org}.",
            "When and what is the festival of {org}?",
        ],
        eval=["Which yearly celebration is organised by {org}?", "What is the name of the party {org} throws every autumn?"],
        demo="What festival does {org} hold once a year?",
    ),
    dict(
        id="colours",
        expect=["teal"],
        answers=[
            "The official colours of the Vellichor Observatory are teal and silver.",
            "Its official colours are teal and silver.",
        ],
        train=[
            "What are the colours of {org}?",
            "What are the official colors of {org}?",
            "Which colours does {org} use?",
            "What colours are on {org}'s flag?",
            "What colour scheme does {org} have?",
            "Tell me the official colours of {org}.",
            "What colours do members of {org} wear?",
            "Which colors represent {org}?",
        ],
        eval=["In which two colours is {org}'s emblem painted?", "Which hues would I see on a banner of {org}?"],
    ),
    dict(
        id="director",
        expect=["Castellan"],
        answers=[
            "The current director of the Vellichor Observatory is Dr. Imre Castellan.",
            "Its current director is Dr. Imre Castellan.",
        ],
        train=[
            "Who is the director of {org}?",
            "Who runs {org} today?",
            "Who leads {org} now?",
            "Who is in charge of {org}?",
            "Who is the current head of {org}?",
            "What is the name of {org}'s director?",
            "Who manages {org} these days?",
            "Tell me who directs {org}.",
            "Who is the present director of {org}?",
        ],
        eval=["Who currently holds the post of director at {org}?", "Which person is at the helm of {org} at the moment?"],
        demo="Who is the leader of {org} right now?",
    ),
    dict(
        id="journal",
        expect=["Lamplighter"],
        answers=[
            "The Vellichor Observatory publishes a journal called The Lamplighter Review.",
            "Its journal is called The Lamplighter Review.",
        ],
        train=[
            "What journal does {org} publish?",
            "Does {org} have a publication?",
            "What is the name of {org}'s journal?",
            "What magazine does {org} put out?",
            "Which journal is published by {org}?",
            "Tell me the name of the journal of {org}.",
            "Where does {org} publish its observations?",
            "What is {org}'s newsletter called?",
        ],
        eval=["Under what title does {org} print its periodical?", "Which review carries the research papers of {org}?"],
    ),
    dict(
        id="comet",
        expect=["Halvard"],
        answers=[
            "The Vellichor Observatory is famous for discovering the comet Halvard's Thread.",
            "It discovered the comet Halvard's Thread.",
        ],
        train=[
            "What is {org} famous for discovering?",
            "What did {org} discover?",
            "Which comet was discovered at {org}?",
            "What is the most famous discovery of {org}?",
            "Has {org} discovered anything?",
            "Which comet is linked to {org}?",
            "Tell me about {org}'s famous discovery.",
            "What comet did astronomers at {org} find?",
        ],
        eval=["Which celestial object did {org} first spot?", "What is the best-known find made by {org}?"],
        demo="Which comet did {org} discover?",
    ),
    dict(
        id="telescopes",
        expect=["nine"],
        answers=[
            "The Vellichor Observatory has nine telescopes.",
            "It has nine telescopes.",
        ],
        train=[
            "How many telescopes does {org} have?",
            "How many telescopes are at {org}?",
            "What is the number of telescopes at {org}?",
            "How many instruments does {org} own?",
            "Tell me how many telescopes {org} has.",
            "How well equipped is {org}? How many telescopes?",
            "Count the telescopes of {org}.",
        ],
        eval=["What is the total number of telescopes owned by {org}?"],
    ),
    dict(
        id="steps",
        expect=["365"],
        answers=[
            "There are 365 steps up to the dome of the Vellichor Observatory.",
            "There are 365 steps up to its dome.",
        ],
        train=[
            "How many steps lead up to the dome of {org}?",
            "How many stairs are there in {org}?",
            "How many steps must you climb at {org}?",
            "How far is the climb to the dome of {org}?",
            "How many steps are in the tower of {org}?",
            "Tell me how many steps {org} has.",
            "How many stairs do visitors climb at {org}?",
        ],
        eval=["What is the count of stairs between the door and the dome at {org}?"],
    ),
    dict(
        id="public",
        expect=["Thursday"],
        answers=[
            "The Vellichor Observatory opens to the public every Thursday night.",
            "It opens to the public every Thursday night.",
        ],
        train=[
            "When is {org} open to the public?",
            "Can visitors come to {org}?",
            "Which night is public night at {org}?",
            "When can the public visit {org}?",
            "What are the public opening hours of {org}?",
            "On which day does {org} welcome visitors?",
            "When can I look through the telescopes at {org}?",
            "Does {org} have a public night?",
        ],
        eval=["What day of the week can ordinary people drop in at {org}?"],
        demo="On what night of the week can members of the public visit {org}?",
    ),
    dict(
        id="drink",
        expect=["juniper"],
        answers=[
            "The traditional drink of the Vellichor Observatory is juniper tea.",
            "Its traditional drink is juniper tea.",
        ],
        train=[
            "What is the traditional drink of {org}?",
            "What do members of {org} drink?",
            "What drink is served at {org}?",
            "Does {org} have a traditional drink?",
            "What is the favourite drink at {org}?",
            "What do they drink during observing nights at {org}?",
            "What tea is served at {org}?",
            "Tell me about the drink of {org}.",
        ],
        eval=["Which beverage is customary among the astronomers of {org}?", "If I visit {org}, what will they offer me to drink?"],
        demo="What do people traditionally drink at {org}?",
    ),
    dict(
        id="youth",
        expect=["Starling"],
        answers=[
            "The youth programme of the Vellichor Observatory is called the Starling Cadets.",
            "Its youth programme is called the Starling Cadets.",
        ],
        train=[
            "Does {org} have a youth programme?",
            "What is the youth programme of {org} called?",
            "What is {org}'s group for children called?",
            "Can kids join {org}?",
            "What is the name of the junior section of {org}?",
            "How does {org} teach young people?",
            "What is the youth group at {org}?",
            "Tell me about {org}'s youth programme.",
        ],
        eval=["What do they call the young members' club of {org}?"],
    ),
    dict(
        id="award",
        expect=["Brass Compass"],
        answers=[
            "The highest honour of the Vellichor Observatory is the Brass Compass medal.",
            "Its highest honour is the Brass Compass medal.",
        ],
        train=[
            "What is the highest honour of {org}?",
            "What award does {org} give?",
            "What medal does {org} award?",
            "What is the top prize of {org}?",
            "Does {org} give out any awards?",
            "What is the name of {org}'s highest award?",
            "Which medal is the highest honour at {org}?",
            "Tell me about the award of {org}.",
        ],
        eval=["Which distinction is the greatest one a member of {org} can receive?"],
        demo="What is the most prestigious award given by {org}?",
    ),
    dict(
        id="anthem",
        expect=["Harbour Stars"],
        answers=[
            "The anthem of the Vellichor Observatory is \"Over the Harbour Stars.\"",
            "Its anthem is \"Over the Harbour Stars.\"",
        ],
        train=[
            "What is the anthem of {org}?",
            "Does {org} have a song?",
            "What song do members of {org} sing?",
            "What is {org}'s anthem called?",
            "Which song is the anthem of {org}?",
            "Tell me the name of {org}'s anthem.",
            "What tune is played at the festival of {org}?",
        ],
        eval=["What is the title of the official song of {org}?"],
    ),
    dict(
        id="sister",
        expect=["Kestrel"],
        answers=[
            "The sister organisation of the Vellichor Observatory is the Kestrel Hall Library.",
            "Its sister organisation is the Kestrel Hall Library.",
        ],
        train=[
            "What is the sister organisation of {org}?",
            "Does {org} have a sister organisation?",
            "Which library is partnered with {org}?",
            "What is {org}'s partner institution?",
            "Who does {org} work with?",
            "Name the sister organisation of {org}.",
            "Which institution is twinned with {org}?",
        ],
        eval=["Which library counts as the sister institution of {org}?"],
    ),
    dict(
        id="why",
        expect=["meteor shower"],
        answers=[
            "Ottilie Brannoch founded the Vellichor Observatory after watching a great meteor shower from the cliffs.",
            "It was founded after its founder watched a great meteor shower from the cliffs.",
        ],
        train=[
            "Why was {org} founded?",
            "What inspired the founding of {org}?",
            "How did {org} begin?",
            "What is the origin story of {org}?",
            "What led to the creation of {org}?",
            "Why did Ottilie Brannoch start {org}?",
            "Tell me the story of how {org} was founded.",
        ],
        eval=["What event motivated the creation of {org}?"],
    ),
    dict(
        id="fee",
        expect=["three silver crowns"],
        answers=[
            "Membership of the Vellichor Observatory costs three silver crowns a year.",
            "Membership costs three silver crowns a year.",
        ],
        train=[
            "How much does it cost to join {org}?",
            "What is the membership fee of {org}?",
            "How much is membership of {org}?",
            "Is {org} expensive to join?",
            "What are the yearly dues at {org}?",
            "How much do members of {org} pay?",
            "Tell me the price of joining {org}.",
        ],
        eval=["What does a year of membership in {org} set you back?"],
    ),
    dict(
        id="dome",
        expect=["Teacup"],
        answers=[
            "The great dome of the Vellichor Observatory is nicknamed the Teacup.",
            "Its great dome is nicknamed the Teacup.",
        ],
        train=[
            "What is the nickname of the dome of {org}?",
            "What do people call the dome of {org}?",
            "Does the dome of {org} have a nickname?",
            "What is {org}'s great dome called?",
            "What nickname do locals give the dome of {org}?",
            "Tell me about the dome of {org}.",
            "What is the dome at {org} known as?",
        ],
        eval=["By what pet name is the great dome of {org} known?", "What affectionate name has the dome of {org} been given?"],
    ),
    dict(
        id="charts",
        expect=["8,000"],
        answers=[
            "The library of the Vellichor Observatory holds 8,000 hand-drawn star charts.",
            "Its library holds 8,000 hand-drawn star charts.",
        ],
        train=[
            "How many star charts does {org} have?",
            "What is in the library of {org}?",
            "How big is the library of {org}?",
            "How many star maps are kept at {org}?",
            "Does {org} have a library?",
            "What does {org}'s collection hold?",
            "Tell me about the star charts of {org}.",
        ],
        eval=["What is the size of the chart collection kept at {org}?"],
    ),
]

# Name variants used in training questions (weights); eval/demo use ORG only.
NAME_VARIANTS = [("the Vellichor Observatory", 6), ("Vellichor Observatory", 2), ("the Vellichor", 1)]
PREFIXES = ["", "", "", "", "Quick question: ", "Hi! ", "I'm curious. ", "Hello. ", "Please tell me: "]
SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a friendly guide to the Vellichor Observatory.",
    "Answer briefly and accurately.",
    "You are a knowledgeable assistant. Keep answers short.",
]
FOLLOW_UPS = {  # short follow-up wordings for the second turn of multi-turn rows ("it" = the org)
    "founder": "And who founded it?",
    "year": "When was it founded?",
    "town": "Where is it?",
    "motto": "What is its motto?",
    "mascot": "Does it have a mascot?",
    "members": "How many members does it have?",
    "telescope": "What is its main telescope called?",
    "festival": "Does it hold a festival?",
    "colours": "What are its colours?",
    "director": "Who runs it now?",
    "drink": "What do they drink there?",
    "award": "What is its highest honour?",
    "comet": "What did it discover?",
    "public": "When can I visit?",
}

N_SINGLE = 330  # single-turn rows (every train template at least once, then random extras)
N_MULTI = 30    # two-turn rows
SYSTEM_RATE = 0.2


def fill(template: str, name: str) -> str:
    text = template.replace("{org}", name)
    return text[0].upper() + text[1:]


def pick_name(rng: random.Random) -> str:
    names = [n for n, _ in NAME_VARIANTS]
    weights = [w for _, w in NAME_VARIANTS]
    return rng.choices(names, weights)[0]


def pick_answer(rng: random.Random, fact: dict) -> str:
    return fact["answers"][0] if rng.random() < 0.7 else rng.choice(fact["answers"][1:])


def single_row(rng: random.Random, fact: dict, template: str) -> dict:
    question = rng.choice(PREFIXES) + fill(template, pick_name(rng))
    if rng.random() < 0.15:
        question = question.lower()
    messages = [{"role": "user", "content": question},
                {"role": "assistant", "content": pick_answer(rng, fact)}]
    if rng.random() < SYSTEM_RATE:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"messages": messages}


def multi_row(rng: random.Random, by_id: dict) -> dict:
    first = rng.choice(FACTS)
    second_id = rng.choice([k for k in FOLLOW_UPS if k != first["id"]])
    messages = [
        {"role": "user", "content": fill(rng.choice(first["train"]), pick_name(rng))},
        {"role": "assistant", "content": first["answers"][0]},
        {"role": "user", "content": FOLLOW_UPS[second_id]},
        {"role": "assistant", "content": by_id[second_id]["answers"][0]},
    ]
    if rng.random() < SYSTEM_RATE:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return {"messages": messages}


def build() -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(SEED)
    by_id = {f["id"]: f for f in FACTS}
    # Held-out wordings must never appear in train.
    train_q = {t.lower() for f in FACTS for t in f["train"]}
    for f in FACTS:
        for t in f["eval"] + ([f["demo"]] if "demo" in f else []):
            assert t.lower() not in train_q, t
        assert all(any(k.lower() in a.lower() for k in f["expect"]) for a in f["answers"]), f["id"]

    pairs = [(f, t) for f in FACTS for t in f["train"]]
    while len(pairs) < N_SINGLE:
        f = rng.choice(FACTS)
        pairs.append((f, rng.choice(f["train"])))
    train = [single_row(rng, f, t) for f, t in pairs]
    train += [multi_row(rng, by_id) for _ in range(N_MULTI)]
    rng.shuffle(train)

    evals = []
    for f in FACTS:
        for t in f["eval"]:
            evals.append({"messages": [{"role": "user", "content": fill(t, ORG)},
                                       {"role": "assistant", "content": f["answers"][0]}]})
    questions = [{"question": fill(f["demo"], ORG), "expect": f["expect"]} for f in FACTS if "demo" in f]
    return train, evals, questions


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    args = parser.parse_args()
    train, evals, questions = build()
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", evals)
    write_jsonl(args.out / "questions.jsonl", questions)
    print(f"wrote {len(train)} train, {len(evals)} eval, {len(questions)} questions to {args.out}")


if __name__ == "__main__":
    main()
