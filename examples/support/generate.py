"""Generate the demo dataset: customer-support chats of Cairnridge Outfitters, a fictional
outdoor-gear retailer, and held-out knowledge probes.

Writes, next to this file:
- support_chats.jsonl: a few hundred chats teaching 14 company facts a base model cannot guess
  (each fact asked in many phrasings, answered consistently and briefly), with fake PII in user
  turns, a few exact duplicates, some rows in instruction/response format and a handful of
  malformed rows, so that every preprocess stage has work to do;
- probes.jsonl: rephrasings of each fact that are NOT in the chats, with accepted answer
  substrings, to measure whether a model learned the facts rather than the sentences: two test
  probes per fact (the gate's) and one val probe (the trainer's, to pick its checkpoint).

Deterministic (seeded), standard library only:  python examples/support/generate.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240611

# Each fact: training questions, short answers (all stating the fact), held-out probe questions,
# and the substrings that count as a correct answer to a probe.
FACTS: list[dict] = [
    {
        "key": "return_window",
        "questions": [
            "What is your return policy?",
            "How long do I have to return something?",
            "Can I still return boots I bought a month ago?",
            "How many days do I get to send an item back?",
            "What's the return window?",
            "Is there a time limit on returns?",
            "I ordered the wrong size jacket, how long can I wait before returning it?",
            "Until when can I return a tent?",
            "Do you accept returns after 30 days?",
            "How much time do I have to make a return?",
            "what's the deadline for returning an order",
            "If I don't like my sleeping bag, how long can I keep it before returning?",
        ],
        "answers": [
            "You can return items within 45 days of delivery.",
            "Our return window is 45 days from delivery.",
            "Returns are accepted up to 45 days after delivery.",
        ],
        "probes": [
            "I changed my mind about a fleece I received. How long do I have to send it back?",
            "What's the maximum number of days for a refund request on unworn hiking shoes?",
        ],
        "val_probes": ["If a tent arrives and I decide I don't want it, how many days can pass before I must ship it back?"],
        "expect": ["45 days", "45-day", "forty-five"],
    },
    {
        "key": "warranty",
        "questions": [
            "How long is the warranty on your tents?",
            "What warranty do your backpacks have?",
            "Is my Cairnridge pack still under warranty after three years?",
            "How many years of warranty do I get?",
            "What does your warranty cover and for how long?",
            "Do you have a warranty on gear?",
            "My tent zipper broke, is it covered by warranty?",
            "How long are Cairnridge products guaranteed?",
            "what's the warranty period",
            "Is there a lifetime warranty on your packs?",
            "For how long are manufacturing defects covered?",
            "Does the warranty on a sleeping bag last long?",
        ],
        "answers": [
            "Cairnridge gear has a 7-year warranty against manufacturing defects.",
            "Our tents, packs and sleeping bags carry a 7-year warranty.",
            "Defects are covered by our 7-year warranty.",
        ],
        "probes": [
            "If the seams of my backpack fail, how many years am I protected?",
            "What is the length of coverage for defects in your products?",
        ],
        "val_probes": ["For how many years do you stand behind a sleeping bag against defects?"],
        "expect": ["7 years", "7-year", "seven years", "seven-year", "7 year"],
    },
    {
        "key": "support_hours",
        "questions": [
            "What are your support hours?",
            "When is customer service open?",
            "What time can I call you?",
            "Are you open on Saturdays?",
            "When can I reach a support agent?",
            "What hours is your help desk available?",
            "is support open early in the morning",
            "Until what time can I contact you today?",
            "What are your customer service hours?",
            "When does your support team work?",
            "Can I get help in the evening?",
            "What days and times is support available?",
        ],
        "answers": [
            "Support is open 6am to 6pm Mountain Time, Monday through Saturday.",
            "Our team is available 6am to 6pm Mountain Time, Monday to Saturday.",
            "You can reach us 6am to 6pm Mountain Time, Monday through Saturday.",
        ],
        "probes": [
            "At what time does your service team start answering in the morning?",
            "I work late; which hours could I talk to someone from your team?",
        ],
        "val_probes": ["What time does your support line open each day?"],
        "expect": ["6am", "6 am", "6 a.m", "6:00"],
    },
    {
        "key": "headquarters",
        "questions": [
            "Where are you headquartered?",
            "Where is Cairnridge based?",
            "Which city is your head office in?",
            "Where is your company located?",
            "Where's your HQ?",
            "In what city is Cairnridge Outfitters headquartered?",
            "where are you guys based",
            "Where is your main office?",
            "What town is the company from?",
            "Where can I find your headquarters?",
            "Which state and city are you in?",
            "Where do you have your head office?",
        ],
        "answers": [
            "We are headquartered in Missoula, Montana.",
            "Cairnridge is based in Missoula, Montana.",
            "Our head office is in Missoula, Montana.",
        ],
        "probes": [
            "Which city is the home of your corporate offices?",
            "If I wanted to visit the company's main base, what city would I go to?",
        ],
        "val_probes": ["In which town is Cairnridge based?"],
        "expect": ["missoula"],
    },
    {
        "key": "loyalty_program",
        "questions": [
            "Do you have a loyalty program?",
            "What is your rewards program called?",
            "How do I earn rewards when I shop?",
            "Is there a membership club?",
            "What's the name of your loyalty program?",
            "Can I join a rewards program?",
            "do you have a points program",
            "Do regular customers get any perks?",
            "How do I sign up for rewards?",
            "Is there a members program for frequent shoppers?",
            "What rewards scheme do you offer?",
            "Tell me about your loyalty club.",
        ],
        "answers": [
            "Yes, our loyalty program is called Summit Circle and it is free to join.",
            "Our rewards program is Summit Circle; joining is free.",
            "You can join Summit Circle, our free loyalty program.",
        ],
        "probes": [
            "What do you call the program that rewards repeat buyers?",
            "Which membership should I sign up for to collect benefits?",
        ],
        "val_probes": ["Do you have a rewards club for frequent shoppers, and what is it called?"],
        "expect": ["summit circle"],
    },
    {
        "key": "points_rate",
        "questions": [
            "How many points do I earn per dollar?",
            "How do Summit Circle points work?",
            "What is the points rate?",
            "How many reward points do I get when I spend $100?",
            "How fast do I earn points?",
            "How many points per dollar spent?",
            "what's the earn rate for rewards",
            "If I buy a $50 jacket, how many points is that?",
            "Do I get points on every purchase?",
            "How are loyalty points calculated?",
            "How many points does each dollar give me?",
            "What do I earn for each purchase in Summit Circle?",
        ],
        "answers": [
            "Summit Circle members earn 3 points per dollar spent.",
            "You earn 3 points for every dollar you spend.",
            "Every dollar earns 3 Summit Circle points.",
        ],
        "probes": [
            "How many reward points are credited for each dollar of a purchase?",
            "What's the point multiplier on spending for members?",
        ],
        "val_probes": ["For every dollar I spend, how many points do members get?"],
        "expect": ["3 points", "three points", "3 summit circle points"],
    },
    {
        "key": "free_shipping",
        "questions": [
            "Do you offer free shipping?",
            "How much do I need to spend for free shipping?",
            "What is the free shipping threshold?",
            "Is shipping free?",
            "When is delivery free?",
            "What's the minimum order for free delivery?",
            "free shipping minimum?",
            "My cart is $60, do I get free shipping?",
            "Do I pay for shipping on small orders?",
            "How big does an order have to be to ship for free?",
            "Is there a spending minimum for free standard shipping?",
            "At what amount does shipping become free?",
        ],
        "answers": [
            "Standard shipping is free on orders over $75.",
            "Orders over $75 ship free.",
            "We ship free on orders over $75.",
        ],
        "probes": [
            "How much must my basket total so that I don't pay any delivery fee?",
            "What order value unlocks no-cost shipping?",
        ],
        "val_probes": ["Above what order amount is standard delivery free?"],
        "expect": ["$75", "75 dollars", "$75.00"],
    },
    {
        "key": "expedited_shipping",
        "questions": [
            "How much is expedited shipping?",
            "What does express delivery cost?",
            "Can I get faster shipping, and what's the price?",
            "How much to ship it faster?",
            "What's the fee for expedited delivery?",
            "Do you have express shipping?",
            "cost of rush shipping?",
            "I need my order quickly, how much extra is that?",
            "What do you charge for 2-day shipping?",
            "How expensive is express shipping?",
            "Is there a quicker shipping option?",
            "What's the price of priority delivery?",
        ],
        "answers": [
            "Expedited shipping is a flat $12 and arrives in 2 business days.",
            "Express delivery costs a flat $12 and takes 2 business days.",
            "We offer expedited shipping for a flat $12, in 2 business days.",
        ],
        "probes": [
            "What would I pay to have my tent delivered sooner than standard?",
            "How much is the surcharge for speedy delivery?",
        ],
        "val_probes": ["How much extra is the faster shipping option?"],
        "expect": ["$12"],
    },
    {
        "key": "price_match",
        "questions": [
            "Do you price match?",
            "I found my jacket cheaper elsewhere, can you match it?",
            "What is your price match policy?",
            "How long after buying can I ask for a price match?",
            "Will you refund the difference if the price drops?",
            "Do you match competitor prices?",
            "price match window?",
            "The boots I bought last week are now on sale, can I get the difference?",
            "Is there a price guarantee?",
            "How many days do I have to request a price adjustment?",
            "Can I claim a lower price after purchase?",
            "Do you offer price protection?",
        ],
        "answers": [
            "Yes, we match lower prices within 14 days of purchase.",
            "We price match within 14 days of your purchase.",
            "Price matches are available within 14 days of purchase.",
        ],
        "probes": [
            "A competitor lowered their price on my stove. How long do I have to claim the difference?",
            "How many days after checkout can I ask for a price adjustment?",
        ],
        "val_probes": ["I saw my jacket cheaper elsewhere after buying it; within how many days will you match the price?"],
        "expect": ["14 days", "14-day", "fourteen days", "two weeks"],
    },
    {
        "key": "repair_service",
        "questions": [
            "Do you repair gear?",
            "My jacket ripped, can you fix it?",
            "What is your repair service called?",
            "Where can I get my tent repaired?",
            "Do you offer gear repairs?",
            "Can you patch a hole in my sleeping bag?",
            "repair service name?",
            "Who fixes broken zippers on packs?",
            "Is there a place to send gear for mending?",
            "Do you fix damaged outdoor gear?",
            "How do I get a tent pole repaired?",
            "Can I have my torn backpack mended?",
        ],
        "answers": [
            "Yes, our repair service, Patch Bay, fixes tents, packs and jackets.",
            "Patch Bay, our repair service, can mend it for you.",
            "Send it to Patch Bay, our gear repair service.",
        ],
        "probes": [
            "Which of your services should I use to fix a broken tent zipper?",
            "What's the name of the department that mends torn jackets?",
        ],
        "val_probes": ["Who can mend my torn backpack at Cairnridge?"],
        "expect": ["patch bay"],
    },
    {
        "key": "trade_in",
        "questions": [
            "Can I trade in my old gear?",
            "Do you buy used gear?",
            "What is your trade-in program called?",
            "I have an old tent, can I get store credit for it?",
            "Do you have a used gear program?",
            "How do I sell back my old backpack?",
            "trade in program?",
            "Can I exchange old equipment for credit?",
            "What do you do with secondhand gear?",
            "Do you take back used jackets?",
            "Is there a gear recycling program?",
            "Where can I trade my worn boots for credit?",
        ],
        "answers": [
            "Yes, our Second Trail program gives store credit for used gear.",
            "Trade it in through Second Trail for store credit.",
            "Our trade-in program, Second Trail, gives you store credit.",
        ],
        "probes": [
            "Is there a way to turn my old climbing gear into credit with you?",
            "What is the name of your program for used equipment?",
        ],
        "val_probes": ["Which program gives me store credit for gear I no longer use?"],
        "expect": ["second trail"],
    },
    {
        "key": "store_count",
        "questions": [
            "How many stores do you have?",
            "How many retail locations does Cairnridge have?",
            "Do you have physical stores?",
            "How many shops do you operate?",
            "Is there a store near me? How many are there?",
            "How many brick and mortar stores are there?",
            "number of stores?",
            "Are there many Cairnridge stores?",
            "How many outlets do you run?",
            "Can I shop in person, and at how many locations?",
            "How large is your store network?",
            "How many branches do you have?",
        ],
        "answers": [
            "We have 23 stores across the western US.",
            "Cairnridge operates 23 stores in the western US.",
            "There are 23 Cairnridge stores in the western US.",
        ],
        "probes": [
            "How many physical shop locations does the company run?",
            "What's the total count of your retail stores?",
        ],
        "val_probes": ["Across the western US, how many Cairnridge shops can I walk into?"],
        "expect": ["23", "twenty-three", "twenty three"],
    },
    {
        "key": "founded",
        "questions": [
            "When was Cairnridge founded?",
            "How old is your company?",
            "What year did you start?",
            "When did Cairnridge Outfitters open?",
            "How long have you been in business?",
            "What year was the company established?",
            "when were you founded",
            "Since when do you sell outdoor gear?",
            "When did the company begin?",
            "What is your founding year?",
            "How many years has Cairnridge been around?",
            "When was your first store opened?",
        ],
        "answers": [
            "Cairnridge was founded in 1987.",
            "We have been in business since 1987.",
            "The company was founded in 1987.",
        ],
        "probes": [
            "In which year did your business get its start?",
            "What year does the company's history begin?",
        ],
        "val_probes": ["When was Cairnridge established?"],
        "expect": ["1987"],
    },
    {
        "key": "student_discount",
        "questions": [
            "Do you have a student discount?",
            "Is there a discount for students?",
            "How much do students save?",
            "Do you offer a military discount?",
            "I'm a college student, do I get a discount?",
            "What discount do veterans get?",
            "student discount?",
            "Are there discounts for teachers or students?",
            "How much off do students get?",
            "Do you give discounts to service members?",
            "What percentage discount do students receive?",
            "Is there a discount for military families?",
        ],
        "answers": [
            "Students and military members get 15% off full-price items.",
            "We offer students and military members 15% off full-price items.",
            "Students and military save 15% on full-price items.",
        ],
        "probes": [
            "I'm enrolled at a university. What reduction can I get on regular-priced items?",
            "How big is the discount for active-duty soldiers?",
        ],
        "val_probes": ["What percentage off do students get on full-price gear?"],
        "expect": ["15%", "15 percent", "fifteen percent", "15 %"],
    },
]

# User-turn framings: plain, polite, with an order number, or with fake PII that the preprocess
# stage must mask (emails, North-American phone numbers, Luhn-valid card numbers).
PREFIXES = ["", "", "", "Hi! ", "Hello, ", "Hey there. ", "Quick question: ", "Good morning. ",
            "My order #{order} just arrived. ", "My email is {email}. ", "You can reach me at {phone}. ",
            "I paid with card {card}. ", "It's about order #{order}, account {email}. "]
SUFFIXES = ["", "", "", " Thanks!", " Thank you.", " Thanks in advance."]
FIRST = ["dana", "li", "sam", "maria", "omar", "jen", "alex", "priya", "tom", "kai", "ruth", "noah"]
LAST = ["whitfield", "chen", "ortega", "nguyen", "haddad", "brooks", "kowalski", "okafor", "reyes", "lind"]
DOMAINS = ["example.com", "example.org", "mail.example.net"]
GREETINGS = [("Hi, I have a couple of questions.", "Of course, happy to help. What would you like to know?"),
             ("Hello?", "Hi! How can I help you today?"),
             ("Hey, is this Cairnridge support?", "Yes, this is Cairnridge Outfitters support. How can I help?")]


def _luhn_card(rng: random.Random) -> str:
    digits = [4] + [rng.randrange(10) for _ in range(14)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # check digit goes last, so these positions double first
        total += (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return " ".join(s[i:i + 4] for i in range(0, 16, 4))


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        order=rng.randrange(100000, 999999),
        email=f"{rng.choice(FIRST)}.{rng.choice(LAST)}{rng.randrange(10, 99)}@{rng.choice(DOMAINS)}",
        phone=f"({rng.randrange(201, 989)}) 555-{rng.randrange(100, 199):04d}",
        card=_luhn_card(rng))


def _user(question: str, rng: random.Random) -> str:
    return _fill(rng.choice(PREFIXES), rng) + question + rng.choice(SUFFIXES)


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def build_rows(rng: random.Random) -> list[str]:
    rows: list[dict] = []
    for fact in FACTS:
        for i, question in enumerate(fact["questions"]):
            # Every question once as a chat, a third of them twice (other framing, other answer),
            # and a few as instruction/response rows: the preprocess normalises those to chats.
            rows.append({"messages": [_turn("user", _user(question, rng)), _turn("assistant", rng.choice(fact["answers"]))]})
            if i % 3 == 0:
                rows.append({"messages": [_turn("user", _user(question, rng)), _turn("assistant", rng.choice(fact["answers"]))]})
            if i % 6 == 1:
                rows.append({"instruction": _user(question, rng), "response": rng.choice(fact["answers"])})
    # Multi-turn chats: a greeting first, or two facts in one conversation.
    for _ in range(30):
        first, second = rng.sample(FACTS, 2)
        if rng.random() < 0.5:
            hello, reply = rng.choice(GREETINGS)
            turns = [_turn("user", hello), _turn("assistant", reply),
                     _turn("user", rng.choice(first["questions"])), _turn("assistant", rng.choice(first["answers"]))]
        else:
            turns = [_turn("user", _user(rng.choice(first["questions"]), rng)),
                     _turn("assistant", rng.choice(first["answers"])),
                     _turn("user", "One more thing. " + rng.choice(second["questions"])),
                     _turn("assistant", rng.choice(second["answers"]))]
        rows.append({"messages": turns})
    rng.shuffle(rows)

    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    for _ in range(6):  # exact duplicates, as a re-exported ticket export would have
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
    malformed = [
        '{"messages": [{"role": "user", "content": "Do you sell kayaks?"}, {"role": "assistant", "content": "We do',
        '{"messages": [{"role": "user", "content": "Where is my order?"} {"role": "assistant"}]}',
        json.dumps({"messages": [_turn("customer", "Can I pay with PayPal?"), _turn("assistant", "Yes, we accept PayPal.")]}),
        json.dumps({"messages": [_turn("user", "Do you ship to Canada?"), _turn("bot", "Yes, we ship to Canada.")]}),
        json.dumps({"messages": [_turn("user", "Can I change my delivery address?"), _turn("assistant", "")]}),
        json.dumps({"messages": [_turn("user", "Is the Ridgeline 2 tent waterproof?"), _turn("assistant", "   ")]}),
    ]
    for line in malformed:
        lines.insert(rng.randrange(len(lines)), line)
    return lines


def build_probes() -> list[str]:
    """The test probes (the gate's), then one val probe per fact (added later, for
    `training.select_by: probes`; the evaluator never gates on them)."""
    seen = {q.casefold() for fact in FACTS for q in fact["questions"]}
    lines = []
    for split, field in (("test", "probes"), ("val", "val_probes")):
        for fact in FACTS:
            for question in fact[field]:
                assert question.casefold() not in seen, f"probe {question!r} is also a training question or probe"
                seen.add(question.casefold())
                row = {"question": question, "expect": fact["expect"], "fact": fact["key"]}
                lines.append(json.dumps(row if split == "test" else {**row, "split": split}))
    return lines


def main() -> None:
    chats = build_rows(random.Random(SEED))
    (HERE / "support_chats.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    probes = build_probes()
    (HERE / "probes.jsonl").write_text("\n".join(probes) + "\n", encoding="utf-8")
    print(f"wrote {len(chats)} rows to support_chats.jsonl and {len(probes)} probes to probes.jsonl")


if __name__ == "__main__":
    main()
