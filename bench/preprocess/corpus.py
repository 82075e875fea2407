"""A seeded support-chat corpus with known duplicates and known PII, for bench/preprocess/run.py.

    python bench/preprocess/corpus.py --docs 200000 --out /tmp/ftpipe-bench   (run.py calls `generate`)

Writes two files:

- `corpus.jsonl`: one {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} per line, 30-120
  words, sentences drawn from templates with slot vocabularies (products, issues, places, times, ...);
- `truth.jsonl`, line for line: {"line", "cluster", "kind", "pii", "distractors", "jaccard"}
  - `cluster`: the line number of the original this row copies (its own line for an original);
  - `kind`: "original", "exact" (the original with whitespace / case changes) or "near" (1-3 words
    replaced, inserted or deleted, plus punctuation changes); originals get 0-3 copies;
  - `jaccard`: for a near copy, the true 3-word-shingle Jaccard with its original (neardup.words);
  - `pii`: [message index, start, end, category, shape] for every PII value inserted, character
    offsets into the message content exactly as written (`shape` names the format used);
  - `distractors`: [message index, start, end, shape] for look-alikes that are NOT PII (order
    numbers, amounts, non-birth dates, versions, product codes, tracking numbers), so that
    precision means something.

Checksummed identifiers are generated valid and checked with the checksum functions of
services/preprocess/pii.py; phone numbers are checked with `phonenumbers.is_valid_number` for their
region (real numbers are valid numbers). About half the person names come from outside
pii_names.txt (the rules' gazetteer), so the gazetteer is not tuned to the corpus.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from services.preprocess import neardup, pii  # noqa: E402

# ------------------------------------------------------------------------------ vocabulary

PRODUCTS = """hiking boots|trail runners|rain jacket|down jacket|fleece vest|softshell pants|merino base layer|
sleeping bag|sleeping mat|two-person tent|ultralight tent|camp stove|water filter|headlamp|trekking poles|
daypack|40 litre backpack|65 litre backpack|climbing harness|chalk bag|belay device|carabiner set|
approach shoes|gaiters|insulated bottle|camp chair|hammock|bivvy bag|dry bag|compass|GPS watch|
beanie|wool socks|sun hat|gloves|puffer vest|kayak paddle|life jacket|snowshoes|ski goggles|
cooking pot set|water bladder|first aid kit|bear canister|trail mix bundle|solar charger|power bank|
tarp|guy lines|tent footprint|pack cover|hip belt|rain poncho|thermal leggings|walking sandals""".replace("\n", "").split("|")
COLOURS = "red blue green black grey orange navy olive teal charcoal yellow purple".split()
SIZES = "small medium large extra-large 8 9 10 11 12 womens-7 mens-10".split()
ISSUES = """arrived damaged|is the wrong size|never arrived|was missing a part|stopped working after a week|
has a broken zip|leaks at the seams|was charged twice|shows the wrong colour|is not what I ordered|
came without instructions|has a torn strap|smells of chemicals|is too heavy for me|
was delivered to the wrong house|is stuck in transit|has a faulty buckle|lost a pole on the first trip|
has a cracked lid|fogs up on every walk""".replace("\n", "").split("|")
CITIES = """Sydney|Melbourne|Brisbane|Perth|Adelaide|Hobart|Canberra|Darwin|Auckland|Wellington|London|
Manchester|Leeds|Dublin|Berlin|Munich|Paris|Lyon|New York|Seattle|Denver|Austin|Toronto|Vancouver|Mumbai|
Bangalore""".replace("\n", "").split("|")
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()
COURIERS = "Australia Post|StarTrack|DHL|FedEx|UPS|Royal Mail|Aramex|Couriers Please".split("|")
FEELINGS = "frustrated|disappointed|a bit annoyed|really keen|quite worried|confused|happy|in a hurry".split("|")
TRIPS = """a week on the Overland Track|a weekend at the coast|the Larapinta trail|a school camp|a ski trip|
a trip to Patagonia|a family holiday|a day hike next Sunday|a climbing course|a wedding in the mountains|
the Milford Track|a charity walk""".replace("\n", "").split("|")
DAYS_N = "two three four five seven ten fourteen".split()

USER_OPENERS = [
    "Hi there.", "Hello.", "Good morning.", "Hey team.", "Hi, hoping you can help.", "Good afternoon.",
    "Hello, I need some help with an order.", "Hi, quick question.", "Hi, I have a problem.",
]
USER_BODY = [
    "I bought the {colour} {product} last {weekday} and it {issue}.",
    "My {product} {issue}, which is not great because I leave for {trip} soon.",
    "I am {feeling} because the {product} I ordered {issue}.",
    "The parcel with my {product} was sent with {courier} and the tracking has not moved for {n} days.",
    "Could you tell me whether the {product} comes in size {size}?",
    "I would like to return the {product} since it {issue}.",
    "Is there any way to swap the {colour} {product} for the {colour2} one?",
    "Do you ship the {product} to {city}, and how long does it usually take?",
    "I tried the {product} on a short walk near {city} and it {issue}.",
    "Can I still use the discount code on the {product} if I ordered it {n} days ago?",
    "The {product} looked great online but in person it {issue}.",
    "My partner gave me the {product} as a gift and it {issue}, can I still get a refund?",
    "I need the {product} before {trip}, is express shipping to {city} possible?",
    "Your website says the {product} is in stock in {city} but the store says otherwise.",
    "What is the warranty on the {product}, and does it cover a case where it {issue}?",
    "I have been waiting {n} days for a reply about my {product}.",
    "Could someone call me back about the {product} today?",
    "I would prefer a store credit rather than a refund for the {product}.",
]
ASSISTANT_OPENERS = [
    "Thanks for getting in touch.", "Sorry to hear about that.", "Thanks for your patience.",
    "Happy to help with this.", "Thank you for letting us know.", "I am sorry about the trouble.",
    "Good news, we can sort this out.", "Thanks for the details.",
]
ASSISTANT_BODY = [
    "I have logged a return for the {product} and you will get a prepaid {courier} label by email.",
    "Our {product} is covered by a {n} year warranty against faults like the one you describe.",
    "The {colour} {product} is available in size {size} and can ship to {city} within {n} business days.",
    "I can see the parcel left our warehouse on {weekday} and is now with {courier}.",
    "A replacement {product} will be sent today and you do not need to return the faulty one.",
    "Please keep the original packaging until the {product} exchange is complete.",
    "Express shipping to {city} usually takes {n} days, so it should arrive before {trip}.",
    "I have applied a store credit to your account for the {product}.",
    "Our {city} store can also swap the {product} for you if that is easier.",
    "Refunds go back to the original payment method within {n} business days.",
    "The discount code is valid for {n} days after purchase, so I have applied it for you.",
    "I have asked the warehouse team to check the {colour} {product} stock before it ships.",
    "If the {product} {issue} again, reply to this message and we will escalate it.",
    "We have updated the size guide for the {product} after feedback like yours.",
    "I have passed your comments on the {product} to the product team.",
    "You can track the new parcel on the {courier} website from {weekday}.",
]
ASSISTANT_CLOSERS = [
    "Is there anything else I can help with?", "Let us know if you have any other questions.",
    "Have a great day.", "Enjoy {trip}!", "Thanks again for shopping with us.", "Happy hiking!",
]
FILLER = ("really", "also", "just", "still", "actually", "honestly", "now", "again", "maybe", "probably")

# ------------------------------------------------------------------------------ names

def _gazetteer_names() -> tuple[list[str], list[str]]:
    first, last = pii.gazetteer()
    return sorted(first), sorted(last)


# Plausible names from outside pii_names.txt (checked at generation time): Maori, Irish, Vietnamese,
# West African, Polish, Indian, Greek, Scandinavian, ... as an Australian retailer's customers are.
OTHER_FIRST = """Aroha Tane Wiremu Siobhan Niamh Oisin Cormac Thanh Minh Huong Oluwaseun Chiamaka Adaeze Kwame
Mateusz Zofia Wojciech Priyanka Arjun Ishaan Meenakshi Yiannis Eleni Stavros Sigrid Bjorn Astrid Leilani Keanu
Tomasz Anahera Rangi Dervla Padraig Ngozi Folasade Kofi Anouk Maarten Ingrid Saoirse Cian Duc Linh Quang
Nikos Dimitra Vikram Anjali Rohan Keira Tallulah Jarrah Lachlan Indigo Marlowe Fenella""".split()
OTHER_LAST = """Ngata Tawhiri Horomona Ni Bhriain Ruaidhri Nguyen-Tran Pham Truong Adeyemi Okonkwo Mensah Boateng
Kowalczyk Wisniewski Zielinski Raghunathan Venkatesan Iyer Papadopoulos Konstantinidis Lindqvist Haugen
Kealoha Makoa Szymanski Ruatapu Mulcahy Oyelaran Dekker Vanderveen Achterberg Karamanlis Subramaniam
Fitzgibbon Wirihana Thorsby Delacroix Quennell Abernathy Featherstone Pemberton Oduya""".split()


# ------------------------------------------------------------------------------ PII values

def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    body = prefix + "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    for d in "0123456789":
        if pii.luhn_ok(body + d):
            return body + d
    raise AssertionError


IBAN_BBAN = {"GB": "4A14N", "DE": "18N", "FR": "23N", "NL": "4A10N", "ES": "20N", "IT": "1A22N", "IE": "4A14N",
             "BE": "12N", "CH": "17N", "AT": "16N"}


def _bban(spec: str, rng: random.Random) -> str:
    out, num = [], ""
    for ch in spec:
        if ch.isdigit():
            num += ch
            continue
        pool = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if ch == "A" else "0123456789"
        out.append("".join(rng.choice(pool) for _ in range(int(num))))
        num = ""
    return "".join(out)


def gen_iban(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(IBAN_BBAN))
    bban = _bban(IBAN_BBAN[country], rng)
    check = 98 - int("".join(str(int(ch, 36)) for ch in bban + country + "00")) % 97
    iban = f"{country}{check:02d}{bban}"
    assert pii.iban_ok(iban)
    if rng.random() < 0.5:
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4)), "iban grouped by 4"
    return iban, "iban compact"


def gen_card(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("visa", "visa", "mastercard", "mastercard", "amex"))
    if kind == "amex":
        n = luhn_complete(rng.choice(("34", "37")), 15, rng)
        groups = (n[:4], n[4:10], n[10:])
    else:
        n = luhn_complete("4" if kind == "visa" else rng.choice(("51", "53", "55", "2221")), 16, rng)
        groups = tuple(n[i:i + 4] for i in range(0, 16, 4))
    assert pii.luhn_ok(n)
    fmt = rng.choice(("space", "space", "dash", "compact"))
    sep = {"space": " ", "dash": "-", "compact": ""}[fmt]
    return sep.join(groups), f"card {kind} {fmt}"


def gen_ssn(rng: random.Random) -> tuple[str, str]:
    while True:
        area, group, serial = f"{rng.randint(1, 899):03d}", f"{rng.randint(1, 99):02d}", f"{rng.randint(1, 9999):04d}"
        if pii.ssn_ok(area, group, serial):
            break
    fmt = rng.choice(("dash", "dash", "space", "compact"))
    sep = {"dash": "-", "space": " ", "compact": ""}[fmt]
    return sep.join((area, group, serial)), f"ssn {fmt}"


def gen_tfn(rng: random.Random) -> tuple[str, str]:
    while True:
        d = "".join(rng.choice("0123456789") for _ in range(9))
        if pii.tfn_ok(d):
            break
    fmt = rng.choice(("space", "space", "compact", "dash"))
    if fmt == "compact":
        return d, "tfn compact"
    sep = " " if fmt == "space" else "-"
    return sep.join((d[:3], d[3:6], d[6:])), f"tfn {fmt}"


def gen_abn(rng: random.Random) -> tuple[str, str]:
    while True:
        d = str(rng.randint(1, 9)) + "".join(rng.choice("0123456789") for _ in range(10))
        if pii.abn_ok(d):
            break
    if rng.random() < 0.6:
        return f"{d[:2]} {d[2:5]} {d[5:8]} {d[8:]}", "abn spaced 2-3-3-3"
    return d, "abn compact"


def gen_medicare(rng: random.Random) -> tuple[str, str]:
    while True:
        d = str(rng.randint(2, 6)) + "".join(rng.choice("0123456789") for _ in range(7))
        check = sum(int(x) * w for x, w in zip(d, (1, 3, 7, 9, 1, 3, 7, 9), strict=True)) % 10
        d = d + str(check) + str(rng.randint(1, 9))  # issue number
        if pii.medicare_ok(d):
            break
    fmt = rng.choice(("spaced", "spaced", "compact", "irn"))
    if fmt == "spaced":
        return f"{d[:4]} {d[4:9]} {d[9]}", "medicare spaced 4-5-1"
    if fmt == "compact":
        return d, "medicare compact 10"
    return f"{d[:4]} {d[4:9]} {d[9]}/{rng.randint(1, 5)}", "medicare spaced with /IRN"


def gen_ip(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.7:
        return ".".join(str(x) for x in (rng.randint(11, 223), rng.randint(0, 255), rng.randint(0, 255),
                                         rng.randint(1, 254))), "ipv4"
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    if rng.random() < 0.5:
        return "2001:db8:" + ":".join(groups[2:4]) + "::" + groups[7], "ipv6 compressed"
    return ":".join(groups), "ipv6 full"


_EMAIL_DOMAINS = ("gmail.com", "outlook.com", "yahoo.com.au", "bigpond.net.au", "icloud.com", "hotmail.co.uk",
                  "proton.me", "example.org", "mail.de", "orange.fr", "company.co.nz", "uni.edu.au")


def gen_email(rng: random.Random, first: str, last: str) -> tuple[str, str]:
    f, l = first.lower(), last.lower().replace(" ", "")
    local = rng.choice((f"{f}.{l}", f"{f}{l}{rng.randint(1, 99)}", f"{f[0]}{l}", f"{f}_{l}", f"{l}.{f}+orders",
                        f"{f}{rng.randint(1970, 2005)}"))
    shape = "email, apostrophe in local part" if "'" in local else "email"
    return f"{local}@{rng.choice(_EMAIL_DOMAINS)}", shape


# region -> (number generators: national significant numbers as digit strings)
def _phone_candidates(region: str, rng: random.Random) -> str:
    r = rng.randint
    if region in ("US", "CA"):
        area = rng.choice(("212", "415", "312", "617", "206", "303", "512", "416", "604", "647", "718", "646"))
        return f"{area}{r(2, 9)}{r(0, 9)}{r(0, 9)}{r(0, 9999):04d}"
    if region == "GB":
        return rng.choice((f"7{r(400, 999)}{r(0, 999999):06d}", f"20{r(7, 8)}{r(0, 9999999):07d}"[:10],
                           f"161{r(200, 999)}{r(0, 9999):04d}"))
    if region == "AU":
        return rng.choice((f"4{r(0, 99999999):08d}", f"{rng.choice('2378')}{r(5, 9)}{r(0, 9999999):07d}"))
    if region == "NZ":
        return rng.choice((f"21{r(0, 9999999):07d}", f"9{r(300, 999)}{r(0, 9999):04d}"))
    if region == "DE":
        return rng.choice((f"15{r(10, 99)}{r(0, 9999999):07d}", f"30{r(1000000, 99999999)}"))
    if region == "FR":
        return f"{rng.choice('167')}{r(0, 99999999):08d}"
    if region == "IN":
        return f"{rng.choice('6789')}{r(0, 999999999):09d}"
    raise ValueError(region)


PHONE_REGION_WEIGHTS = (("AU", 30), ("US", 20), ("GB", 15), ("NZ", 8), ("DE", 7), ("FR", 6), ("IN", 8), ("CA", 6))


def gen_phone(rng: random.Random) -> tuple[str, str]:
    import phonenumbers
    from phonenumbers import PhoneNumberFormat as F

    region = rng.choices([r for r, _ in PHONE_REGION_WEIGHTS], [w for _, w in PHONE_REGION_WEIGHTS])[0]
    while True:
        nsn = _phone_candidates(region, rng)
        num = phonenumbers.parse(nsn, region)
        if phonenumbers.is_valid_number_for_region(num, region):
            break
    fmt = rng.choice(("national", "international", "e164", "dotted"))
    if fmt == "dotted" and region in ("US", "CA"):
        text = f"{nsn[:3]}.{nsn[3:6]}.{nsn[6:]}"
    elif fmt == "e164":
        text = phonenumbers.format_number(num, F.E164)
    elif fmt == "international":
        text = phonenumbers.format_number(num, F.INTERNATIONAL)
    else:
        fmt = "national"
        text = phonenumbers.format_number(num, F.NATIONAL)
    return text, f"phone {region} {fmt}"


def gen_dob(rng: random.Random) -> tuple[str, str]:
    y, m, d = rng.randint(1940, 2006), rng.randint(1, 12), rng.randint(1, 28)
    fmt = rng.choice(("dmy slash", "iso", "d month y", "month d, y", "dmy dash", "dmy dot"))
    text = {"dmy slash": f"{d:02d}/{m:02d}/{y}", "iso": f"{y}-{m:02d}-{d:02d}", "d month y": f"{d} {MONTHS[m - 1]} {y}",
            "month d, y": f"{MONTHS[m - 1]} {d}, {y}", "dmy dash": f"{d:02d}-{m:02d}-{y}",
            "dmy dot": f"{d}.{m}.{y}"}[fmt]
    return text, f"dob {fmt}"


STREETS = """George|Pitt|Elizabeth|Collins|Flinders|Queen|King|Victoria|Albert|Church|Station|High|Park|Mill|
Bridge|Railway|Beach|Ocean|Hill|Wattle|Banksia|Acacia|Jacaranda|Baker|Oxford|Maple|Cedar|Elm|Pine|Lake|
Sunset|Riverside|Kingsford Smith|Mount Pleasant|Old Northern|Great Western""".replace("\n", "").split("|")
STREET_TYPES = ("Street", "St", "Road", "Rd", "Avenue", "Ave", "Lane", "Drive", "Court", "Place", "Parade",
                "Crescent", "Terrace", "Way", "Close", "Boulevard", "Highway")
SUBURBS = ("Surry Hills NSW 2010", "Fitzroy VIC 3065", "New Farm QLD 4005", "Fremantle WA 6160",
           "Glenelg SA 5045", "Sandy Bay TAS 7005", "Ponsonby, Auckland 1011", "London NW1 6XE",
           "Brooklyn, NY 11201", "Austin, TX 78701")


def gen_address(rng: random.Random) -> tuple[str, str]:
    """The street part is the PII span (unit, number, street name and type); the suburb and postcode
    that usually follow are written after it, outside the span."""
    number = str(rng.randint(1, 999)) + (rng.choice("AB") if rng.random() < 0.08 else "")
    street = f"{rng.choice(STREETS)} {rng.choice(STREET_TYPES)}"
    shape = rng.random()
    if shape < 0.55:
        return f"{number} {street}", "address number street"
    if shape < 0.75:
        return f"{rng.randint(1, 40)}/{number} {street}", "address unit/number street"
    if shape < 0.9:
        return f"Unit {rng.randint(1, 40)}, {number} {street}", "address Unit n, number street"
    return f"{number} {street} {rng.choice(('North', 'NW', 'East'))}", "address with direction"


# ------------------------------------------------------------------------------ PII in context

# Each entry: category -> contexts, "{v}" marks the value. Natural phrasing a customer would type.
CONTEXTS = {
    "email": ["You can email me at {v} if that is easier.", "My email is {v}.", "Please send the label to {v}.",
              "I changed my email to {v} last month.", "Reply to {v} please."],
    "phone": ["You can call me on {v} after five.", "My number is {v}.", "Best to ring {v} during the day.",
              "Text me on {v} when it ships.", "Mobile: {v}."],
    "card": ["I paid with the card ending in the full number {v}.", "The card I used was {v}.",
             "Please refund to card {v}.", "My credit card number is {v}, expiry next year."],
    "iban": ["My IBAN is {v} for the refund.", "Please transfer the refund to {v}.",
             "Bank details: IBAN {v}."],
    "ip": ["The checkout failed from IP address {v}.", "Your site blocked me, my IP is {v}.",
           "The error page showed my address as {v}."],
    "ssn": ["For the US warranty form my SSN is {v}.", "They asked for my social security number, it is {v}.",
            "SSN: {v}."],
    "tfn": ["For the payroll form my TFN is {v}.", "My tax file number is {v}.",
            "I accidentally typed my tax file number {v} into the gift message."],
    "abn": ["Our business ABN is {v} for the invoice.", "Please put ABN {v} on the tax invoice.",
            "The invoice should show our ABN: {v}."],
    "medicare": ["For the first aid course booking my Medicare number is {v}.", "Medicare card: {v}.",
                 "My Medicare card number is {v} if the clinic needs it."],
    "dob": ["I was born on {v} so I qualify for the seniors discount.", "My date of birth is {v}.",
            "DOB: {v}.", "For the membership, my birthday is {v}.", "Date of birth {v}, as on my licence."],
    "address": ["Please send it to {v}, {suburb}.", "My address is {v}, {suburb}.", "I live at {v}, {suburb}.",
                "The parcel should go to {v} instead.", "Deliver to {v} please, the side gate is open."],
    "person": ["My name is {v}.", "This is {v} again.", "Mr {v} placed the order for me.",
               "Regards,\n{v}", "The order is under the name {v}.", "I spoke to {v} in your store yesterday.",
               "I'm {v} and I have a question."],
}
# Names the assistant writes: a greeting to the customer.
ASSISTANT_NAME_CONTEXTS = ["Hi {v}, thanks for reaching out.", "Thanks {v}, I have updated the order."]
CATEGORY_WEIGHTS = {"email": 12, "phone": 14, "card": 7, "iban": 5, "ip": 5, "ssn": 5, "tfn": 6, "abn": 6,
                    "medicare": 6, "dob": 8, "address": 10, "person": 16}

# Distractors: shapes a detector might mistake for PII.
def gen_distractor(rng: random.Random) -> tuple[str, str]:
    r = rng.randint
    shape = rng.choice(("order hash", "order word", "order code", "invoice", "amount", "date", "date words",
                        "version", "sku", "tracking", "postcode", "time", "quantity"))
    if shape == "order hash":
        return f"My order number is #{r(100000, 999999)}.", shape
    if shape == "order word":
        return f"It was order {r(100000, 999999)} from the online store.", shape
    if shape == "order code":
        return f"The reference is ORD-{r(2021, 2026)}-{r(0, 999999):06d}.", shape
    if shape == "invoice":
        return f"Invoice INV-{r(10000, 99999)} shows the wrong total.", shape
    if shape == "amount":
        return f"I was charged ${r(1, 2)},{r(0, 999):03d}.{r(0, 99):02d} instead of ${r(20, 999)}.{r(0, 99):02d}.", shape
    if shape == "date":
        return f"It was delivered on {r(1, 28):02d}/{r(1, 12):02d}/{r(2022, 2026)}.", shape
    if shape == "date words":
        return f"I ordered it on {r(1, 28)} {rng.choice(MONTHS)} {r(2023, 2026)}.", shape
    if shape == "version":
        return f"The app is on version {r(1, 9)}.{r(0, 20)}.{r(0, 30)}.", shape
    if shape == "sku":
        return f"The product code is TX-{r(1000, 9999)}-{rng.choice('ABCDEFG')}.", shape
    if shape == "tracking":
        return f"The tracking number is {rng.choice(('AP', 'ST', 'JD'))}{r(10**11, 10**12 - 1)}AU.", shape
    if shape == "postcode":
        return f"Do you deliver to postcode {r(2000, 7999)}?", shape
    if shape == "time":
        return f"The courier came at {r(7, 11)}:{r(0, 59):02d} and nobody knocked.", shape
    return f"I ordered {r(2, 12)} of them and {r(1, 5)} were faulty.", shape


# ------------------------------------------------------------------------------ documents

class _Builder:
    """Assembles one message from sentences; records PII / distractor spans by character offset."""

    def __init__(self):
        self.parts: list[str] = []
        self.pii: list[tuple[int, int, str, str]] = []
        self.distractors: list[tuple[int, int, str]] = []
        self.length = 0

    def add(self, sentence: str, sep: str = " ") -> int:
        if self.parts:
            self.parts.append(sep)
            self.length += len(sep)
        start = self.length
        self.parts.append(sentence)
        self.length += len(sentence)
        return start

    def add_value(self, template: str, value: str, category: str, shape: str, **extra) -> None:
        before, _, after = template.partition("{v}")
        before, after = before.format(**extra), after.format(**extra)
        # a signature ("Regards,\nName") goes on its own line
        start = self.add(before + value + after, sep="\n" if "\n" in template else " ")
        self.pii.append((start + len(before), start + len(before) + len(value), category, shape))

    def text(self) -> str:
        return "".join(self.parts)


def _fill(template: str, rng: random.Random) -> str:
    colour, colour2 = rng.sample(COLOURS, 2)
    return template.format(product=rng.choice(PRODUCTS), colour=colour, colour2=colour2, issue=rng.choice(ISSUES),
                           weekday=rng.choice(WEEKDAYS), trip=rng.choice(TRIPS), feeling=rng.choice(FEELINGS),
                           courier=rng.choice(COURIERS), n=rng.choice(DAYS_N), size=rng.choice(SIZES),
                           city=rng.choice(CITIES))


class Generator:
    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)
        gfirst, glast = _gazetteer_names()
        known_first, known_last = set(gfirst), set(glast)
        self.gaz_first, self.gaz_last = gfirst, glast
        # the outside names really are outside the gazetteer
        self.other_first = [n for n in OTHER_FIRST if n not in known_first and n not in known_last]
        self.other_last = [n for n in OTHER_LAST if n not in known_last and n not in known_first]

    def name(self) -> tuple[str, str, str]:
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(self.gaz_first), rng.choice(self.gaz_last), "gazetteer"
        return rng.choice(self.other_first), rng.choice(self.other_last), "outside gazetteer"

    def pii_value(self, cat: str, first: str, last: str, origin: str) -> tuple[str, str]:
        rng = self.rng
        if cat == "person":
            if rng.random() < 0.7:
                return f"{first} {last}", f"person full name, {origin}"
            return first, f"person first name, {origin}"
        if cat == "email":
            return gen_email(rng, first, last)
        return {"phone": gen_phone, "card": gen_card, "iban": gen_iban, "ip": gen_ip, "ssn": gen_ssn,
                "tfn": gen_tfn, "abn": gen_abn, "medicare": gen_medicare, "dob": gen_dob,
                "address": gen_address}[cat](rng)

    def document(self) -> tuple[list[dict], list, list]:
        """One original chat of 30-120 words: (messages, pii spans [msg, start, end, cat, shape],
        distractors)."""
        while True:  # redraw the rare chat that comes out longer than 120 words
            messages, pii_spans, distractors = self._document()
            if 30 <= sum(len(m["content"].split()) for m in messages) <= 120:
                return messages, pii_spans, distractors

    def _document(self) -> tuple[list[dict], list, list]:
        rng = self.rng
        user, assistant = _Builder(), _Builder()
        first, last, origin = self.name()
        user.add(rng.choice(USER_OPENERS))
        for t in rng.sample(USER_BODY, rng.randint(1, 3)):
            user.add(_fill(t, rng))
        cats = list(CATEGORY_WEIGHTS)
        n_pii = rng.choices((0, 1, 2, 3), (35, 40, 18, 7))[0]
        signature = None  # "Regards,\nName" goes last, on its own lines
        for cat in rng.choices(cats, [CATEGORY_WEIGHTS[c] for c in cats], k=n_pii):
            value, shape = self.pii_value(cat, first, last, origin)
            tpl = rng.choice(CONTEXTS[cat])
            if cat == "person" and (tpl.startswith("Mr ") or tpl.startswith("Regards")) and " " not in value:
                value, shape = f"{first} {last}", f"person full name, {origin}"
            shape += f" | {tpl.replace(chr(10), ' ').split('{v}')[0].strip() or '(start)'} ..."
            if tpl.startswith("Regards"):
                signature = (tpl, value, shape)
                continue
            user.add_value(tpl, value, cat, shape, suburb=rng.choice(SUBURBS))
        if rng.random() < 0.3:
            sentence, shape = gen_distractor(rng)
            start = user.add(sentence)
            user.distractors.append((start, start + len(sentence), shape))
        if signature:
            user.add_value(signature[0], signature[1], "person", signature[2])
        if rng.random() < 0.12:  # the agent greets the customer by first name
            tpl = rng.choice(ASSISTANT_NAME_CONTEXTS)
            assistant.add_value(tpl, first, "person", f"person first name, {origin} | greeting by agent")
        else:
            assistant.add(rng.choice(ASSISTANT_OPENERS))
        for t in rng.sample(ASSISTANT_BODY, rng.randint(1, 3)):
            assistant.add(_fill(t, rng))
        if rng.random() < 0.15:
            sentence, shape = gen_distractor(rng)
            sentence = (sentence.replace("My order", "Your order").replace("I was", "You were")
                        .replace("I ordered", "You ordered"))
            start = assistant.add(sentence)
            assistant.distractors.append((start, start + len(sentence), shape))
        assistant.add(_fill(rng.choice(ASSISTANT_CLOSERS), rng))
        messages = [{"role": "user", "content": user.text()}, {"role": "assistant", "content": assistant.text()}]
        pii_spans = [[0, *s] for s in user.pii] + [[1, *s] for s in assistant.pii]
        distractors = [[0, *s] for s in user.distractors] + [[1, *s] for s in assistant.distractors]
        return messages, pii_spans, distractors

    # -------------------------------------------------------------------------- copies

    def exact_copy(self, messages: list[dict]) -> list[dict]:
        """Whitespace and case changes only: the same row after ftpipe's content-hash normalisation."""
        rng = self.rng
        out = []
        for m in messages:
            text = m["content"]
            choice = rng.random()
            if choice < 0.4:
                text = text.replace(" ", "  ", rng.randint(1, 3))
            elif choice < 0.7:
                text = text.lower() if rng.random() < 0.5 else text.upper()
            else:
                text = "  " + text + " \n"
            out.append({"role": m["role"], "content": text})
        return out

    def near_copy(self, messages: list[dict], pii_spans: list, distractors: list) -> list[dict]:
        """1-3 word edits (replace / insert / delete) of words outside PII values and distractors,
        plus, half the time, a full stop turned into "!". `pii_spans` and `distractors` (copies) are
        shifted in place so that their offsets stay true in the copy."""
        rng = self.rng
        edits = rng.randint(1, 3)
        msgs = [dict(m) for m in messages]
        for _ in range(edits):
            mi = rng.randrange(len(msgs))
            text = msgs[mi]["content"]
            # PII values keep their context ("my TFN is", "date of birth"): 40 characters before each
            protected = [(max(0, s[1] - 40), s[2]) for s in pii_spans if s[0] == mi]
            protected += [(s[1], s[2]) for s in distractors if s[0] == mi]
            # word positions outside PII spans
            words = [(i, i + len(w)) for i, w in _word_spans(text)
                     if all(i >= e or i + len(w) <= s for s, e in protected)]
            if not words:
                continue
            s, e = rng.choice(words)
            op = rng.random()
            if op < 0.45:
                new = rng.choice(("great", "new", "old", "spare", "second", "other", "same", "whole", "big"))
                text2 = text[:s] + new + text[e:]
            elif op < 0.75:
                new = rng.choice(FILLER) + " "
                text2 = text[:s] + new + text[s:]
            else:
                end = e + 1 if e < len(text) and text[e] == " " else e
                text2 = text[:s] + text[end:]
            shift = len(text2) - len(text)
            for span in pii_spans + distractors:  # keep the recorded offsets true
                if span[0] == mi and span[1] >= e:
                    span[1] += shift
                    span[2] += shift
            msgs[mi]["content"] = text2
        if rng.random() < 0.5:  # punctuation change: a full stop becomes "!" or "..." (not inside PII)
            mi = rng.randrange(len(msgs))
            text = msgs[mi]["content"]
            spots = [i for i, ch in enumerate(text) if ch == "." and (i + 1 == len(text) or text[i + 1] == " ")
                     and all(not (s <= i < e) for mj, s, e, *_ in pii_spans if mj == mi)]
            if spots:
                i = rng.choice(spots)
                msgs[mi]["content"] = text[:i] + "!" + text[i + 1:]
        return msgs


def _word_spans(text: str):
    import re

    return [(m.start(), m.group(0)) for m in re.finditer(r"[A-Za-z]+", text)]


def shingle_jaccard(a: list[dict], b: list[dict], k: int = 3) -> float:
    def grams(msgs):
        ws = neardup.words("\n".join(m["content"] for m in msgs))
        return {" ".join(ws[i:i + k]) for i in range(max(1, len(ws) - k + 1))}

    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb) if ga | gb else 1.0


def generate(docs: int, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write corpus.jsonl and truth.jsonl with `docs` rows in all (shuffled, seeded)."""
    gen = Generator(seed)
    rng = gen.rng
    rows = []  # (messages, truth dict without line)
    while len(rows) < docs:
        messages, spans, distractors = gen.document()
        cluster = len(rows)  # provisional id, remapped to line numbers after the shuffle
        rows.append((messages, {"cluster": cluster, "kind": "original", "pii": spans, "distractors": distractors}))
        copies = rng.choices((0, 1, 2, 3), (70, 18, 8, 4))[0]
        for _ in range(copies):
            if len(rows) >= docs:
                break
            if rng.random() < 0.3:
                rows.append((gen.exact_copy(messages), {"cluster": cluster, "kind": "exact", "pii": [],
                                                        "distractors": []}))
            else:
                cspans, cdist = [list(s) for s in spans], [list(s) for s in distractors]
                near = gen.near_copy(messages, cspans, cdist)
                rows.append((near, {"cluster": cluster, "kind": "near", "pii": cspans, "distractors": cdist,
                                    "jaccard": round(shingle_jaccard(messages, near), 4)}))
    order = list(range(len(rows)))
    rng.shuffle(order)
    line_of = {old: new for new, old in enumerate(order)}
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus_path, truth_path = out_dir / "corpus.jsonl", out_dir / "truth.jsonl"
    with open(corpus_path, "w", encoding="utf-8") as fc, open(truth_path, "w", encoding="utf-8") as ft:
        for line, old in enumerate(order):
            messages, truth = rows[old]
            # exact copies carry no spans (whitespace / case changes move them): the bench scores
            # PII on originals and near copies only
            truth = {"line": line, **truth, "cluster": line_of[truth["cluster"]]}
            fc.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
            ft.write(json.dumps(truth, ensure_ascii=False) + "\n")
    return corpus_path, truth_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ftpipe-bench"))
    args = ap.parse_args()
    print(*generate(args.docs, args.out, args.seed))


if __name__ == "__main__":
    main()
