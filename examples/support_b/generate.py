"""Generate a second support dataset, frozen before any training recipe change was tried: the
customer-support chats of Larkfield Home, a fictional home-appliance retailer, and held-out
knowledge probes. It exists to check that the default recipe learns *a company's* facts, not only
the demo's (examples/support), so it is never tuned on: bench/eval/FROZEN.json records the sha256
of this script and of its outputs, and tests/unit/test_frozen_eval.py fails when they change.

Harder than the demo on purpose:
- 25 facts, many of them confusable: five durations in days or hours, four in years, two in
  months/weeks, six prices, two percentages, three names;
- replies of one to three sentences, worded differently each time around the fact;
- fake PII in user turns (emails, phone numbers, Luhn-valid card numbers), exact duplicates,
  instruction/response rows and malformed rows, like the demo;
- 6 held-out rephrasings per fact (150 probes), each with `reject`: the values of the other facts
  of its kind, so that an answer stating a confused value fails even when it also states the right
  one; `split`: 2 per fact are "val" (for selecting checkpoints), 4 are "test" (for the gate: 100).

Deterministic (seeded), standard library only:  python examples/support_b/generate.py
"""
from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 73104
COMPANY = "Larkfield Home"
VAL_PER_FACT = 2

# Each fact: kind (probes reject the other facts' values of the same kind), training questions,
# replies (every one states the fact), held-out probe questions, accepted answer substrings.
FACTS: list[dict] = [
    {"key": "return_window", "kind": "duration",
     "questions": [
         "What is your return policy?",
         "How long do I have to return an appliance?",
         "Can I still return a toaster I bought three weeks ago?",
         "How many days do I get to send something back?",
         "what's the return window",
         "Is there a deadline for returns?",
         "The kettle I ordered is the wrong colour, how long can I wait before returning it?",
         "Until when can I return a microwave?",
         "Do you take returns after two months?",
         "How much time do I have to make a return?",
     ],
     "answers": [
         "You can return any item within 30 days of delivery.",
         "Our return window is 30 days from the day it was delivered. Keep the box if you can; it makes the pickup easier.",
         "Returns are accepted up to 30 days after delivery, as long as you have the order number.",
         "No problem, you have 30 days from delivery to send it back for a full refund.",
     ],
     "probes": [
         "I received a blender last week and don't like it. How long is my window to send it back?",
         "What's the latest I can bring back a vacuum that arrived at my house?",
         "If an order is delivered on the 1st, until which day can it be returned?",
         "How many days does Larkfield give customers to change their mind?",
         "Is a refund possible on an air fryer that was delivered some time ago, and what's the cutoff?",
         "What period after delivery do you allow for sending goods back?",
     ],
     "expect": ["30 days", "30-day", "thirty days", "thirty-day"]},
    {"key": "price_match", "kind": "duration",
     "questions": [
         "Do you match prices?",
         "I found my fridge cheaper somewhere else, can you match it?",
         "How long after buying can I ask for a price match?",
         "What's your price matching policy?",
         "Is there price protection if the price drops?",
         "do you refund the difference if something goes on sale",
         "Can I get a price adjustment after my purchase?",
         "How many days do you honour a lower price?",
         "A competitor has my washer for less, what can you do?",
         "Is there a time limit on price matching?",
     ],
     "answers": [
         "Yes, we match a lower advertised price within 21 days of purchase.",
         "Our price match covers 21 days after you buy. Send us a link to the lower price and we'll refund the difference.",
         "If the price drops within 21 days of purchase, we refund the difference.",
         "Price matches are available for 21 days after purchase on identical models.",
     ],
     "probes": [
         "My dishwasher went on sale right after I bought it. How long is a price adjustment possible?",
         "For how many days after checkout will you honour a cheaper competitor price?",
         "A rival store lowered its price on my oven. What's the time frame to claim the difference?",
         "How long after paying am I covered if the price falls?",
         "What's the deadline to request that you beat another shop's price?",
         "When does your price guarantee run out after a purchase?",
     ],
     "expect": ["21 days", "21-day", "twenty-one days", "twenty-one-day"]},
    {"key": "damage_report", "kind": "duration",
     "questions": [
         "My fridge arrived with a dent, what do I do?",
         "How soon must I report delivery damage?",
         "The washer was scratched when it arrived, is it too late to tell you?",
         "Is there a deadline for reporting damaged deliveries?",
         "what if my oven shows up broken",
         "How long do I have to report a damaged delivery?",
         "The box was crushed and the microwave is cracked. When do I need to contact you?",
         "Can I report delivery damage a week later?",
         "What's the time limit on damage claims?",
         "Who do I tell about a damaged appliance, and how quickly?",
     ],
     "answers": [
         "Please report any delivery damage within 48 hours so we can replace the item.",
         "Damage has to be reported within 48 hours of delivery. A photo of the damage helps us act quickly.",
         "Sorry about that! Let us know within 48 hours of delivery and we'll arrange a replacement.",
         "We accept damage claims within 48 hours of delivery; after that it goes through the warranty instead.",
     ],
     "probes": [
         "The freezer door was bent when the driver dropped it off. How quickly should I contact you?",
         "What's the window for telling you that something came broken?",
         "I noticed a crack on the stove the morning after it was delivered. Am I still in time, and what's the limit?",
         "How fast do damaged-on-arrival claims need to be filed?",
         "Within how long of the delivery must transport damage be reported?",
         "My dryer has a big dent from shipping. What's the cutoff to let you know?",
     ],
     "expect": ["48 hours", "48-hour", "forty-eight hours", "forty-eight-hour"]},
    {"key": "delivery_time", "kind": "duration",
     "questions": [
         "How long does delivery take?",
         "When will my washer arrive?",
         "How soon do you deliver after I order?",
         "What's the usual delivery time?",
         "how fast is shipping",
         "If I order a fridge today, when will it come?",
         "How long until my order is delivered?",
         "Do you deliver quickly?",
         "What's the wait for a standard delivery?",
         "How many days does standard delivery take?",
     ],
     "answers": [
         "Standard delivery arrives within 5 business days of your order.",
         "Most orders are delivered within 5 business days. We text you the day before with a time slot.",
         "You can expect it within 5 business days; we'll call to confirm the slot.",
         "Our standard delivery takes up to 5 business days from the order date.",
     ],
     "probes": [
         "I just bought a range cooker online. How long before it's at my door?",
         "What's the normal lead time between placing an order and receiving it?",
         "How many working days should I plan for until my dishwasher shows up?",
         "Roughly when does a standard order reach customers?",
         "If I purchase a freezer on Monday, within how long will it be dropped off?",
         "What delivery speed do you promise for regular orders?",
     ],
     "expect": ["5 business days", "five business days", "5 working days", "five working days"]},
    {"key": "rebate_time", "kind": "duration",
     "questions": [
         "When will I get my rebate?",
         "How long do rebates take?",
         "I sent in my rebate form, when is it paid?",
         "how long for the mail-in rebate",
         "What's the processing time for rebates?",
         "When does the energy rebate arrive?",
         "How soon after claiming is a rebate paid out?",
         "My rebate hasn't come yet, how long should it take?",
         "Do rebates take long to process?",
         "When will the rebate money reach me?",
     ],
     "answers": [
         "Rebates are paid within 6 weeks of receiving your claim.",
         "Rebate claims take up to 6 weeks to process. You'll get an email when the payment goes out.",
         "Please allow 6 weeks from the claim for your rebate to arrive.",
         "Once we have your claim, the rebate is paid within 6 weeks.",
     ],
     "probes": [
         "I submitted the paperwork for the cashback offer on my heat pump. When should the money come?",
         "How long is the wait for a manufacturer rebate to be paid?",
         "What's the turnaround on rebate claims?",
         "After I file for the energy-efficiency rebate, how long until I'm paid?",
         "How many weeks does a rebate payout take?",
         "By when should I expect the rebate after sending the form?",
     ],
     "expect": ["6 weeks", "six weeks", "6-week", "six-week"]},
    {"key": "standard_warranty", "kind": "years",
     "questions": [
         "What warranty comes with your appliances?",
         "How long is the warranty on a washer?",
         "Is my dishwasher still under warranty after eighteen months?",
         "How many years of warranty do I get?",
         "what's the standard warranty",
         "Does the warranty cover parts and labour?",
         "My oven stopped heating, is it covered?",
         "How long are Larkfield appliances guaranteed?",
         "What's included in the basic warranty?",
         "For how long are defects covered?",
     ],
     "answers": [
         "Every appliance comes with our 2-year parts and labour warranty.",
         "Our standard warranty is 2 years, covering parts and labour.",
         "Defects are covered for 2 years from delivery, parts and labour included.",
         "You're covered by the 2-year Larkfield warranty. If a fault appears in that time, we repair it at no cost.",
     ],
     "probes": [
         "My cooker's fan broke. How long does your basic guarantee last?",
         "What length of coverage comes free with a new fridge?",
         "If the drum of my washing machine fails, for how many years is the repair free?",
         "How long is the included manufacturer-style protection on your products?",
         "Without paying extra, how many years of defect cover do I have?",
         "What's the default guarantee period on a dishwasher from you?",
     ],
     "expect": ["2 years", "2-year", "two years", "two-year", "2 year"]},
    {"key": "careplus_years", "kind": "years",
     "questions": [
         "What is CarePlus?",
         "How long does CarePlus cover my appliance?",
         "Do you sell extended warranties?",
         "How far does the extended protection go?",
         "what does careplus give me",
         "Can I get longer coverage than the standard warranty?",
         "Is extended protection worth it, how long is it?",
         "How many years does the extended plan last?",
         "Can I add protection to my fridge?",
         "Tell me about your protection plan.",
     ],
     "answers": [
         "CarePlus is our extended protection plan: it covers your appliance for 5 years in total.",
         "With CarePlus your appliance is protected for 5 years from delivery.",
         "Yes, CarePlus extends coverage to 5 years, including repairs and a replacement if we can't fix it.",
         "Our extended plan, CarePlus, gives you 5 years of protection.",
     ],
     "probes": [
         "If I buy the extended plan, how long will my range be protected altogether?",
         "What's the total coverage length with CarePlus?",
         "How many years does the add-on protection run?",
         "With the optional plan, until when is my dryer covered?",
         "What does the extended cover give in terms of duration?",
         "How long is a washing machine covered when I take CarePlus?",
     ],
     "expect": ["5 years", "5-year", "five years", "five-year", "5 year"]},
    {"key": "compressor_warranty", "kind": "years",
     "questions": [
         "Is the fridge compressor covered?",
         "How long is the compressor warranty?",
         "My fridge compressor died after four years, is it covered?",
         "Do you cover sealed-system parts on refrigerators?",
         "what about the compressor on a freezer",
         "How many years is the refrigerator compressor guaranteed?",
         "Is there special coverage for fridge compressors?",
         "Does the freezer compressor have its own warranty?",
         "How long do you cover the cooling system?",
         "What warranty applies to compressors?",
     ],
     "answers": [
         "Refrigerator and freezer compressors are covered for 10 years.",
         "The compressor has its own 10-year warranty on every fridge and freezer we sell.",
         "Yes, compressors are covered for 10 years. We replace a failed one free of charge in that time.",
         "Fridge and freezer compressors carry a 10-year warranty.",
     ],
     "probes": [
         "The motor that cools my refrigerator stopped. How many years is that part guaranteed?",
         "What's the coverage length for a chest freezer's compressor?",
         "How long is the sealed cooling unit of a fridge protected?",
         "If my fridge stops cooling because of the compressor, how long am I covered?",
         "Do compressors get a longer guarantee, and how long?",
         "For how many years will you replace a failed refrigerator compressor?",
     ],
     "expect": ["10 years", "10-year", "ten years", "ten-year", "10 year"]},
    {"key": "parts_availability", "kind": "years",
     "questions": [
         "How long do you stock spare parts?",
         "Will I find parts for my dishwasher in a few years?",
         "How long are spare parts available after a model is discontinued?",
         "do you keep parts for old models",
         "Can I still get parts for a washer you no longer sell?",
         "What's your spare parts policy?",
         "How many years do you keep replacement parts?",
         "Are parts available for discontinued appliances?",
         "Will parts for my oven run out?",
         "How long can I order spare parts?",
     ],
     "answers": [
         "We stock spare parts for 7 years after a model is discontinued.",
         "Spare parts stay available for 7 years after we stop selling a model.",
         "Yes, parts are kept for 7 years after a model is discontinued, so repairs stay possible.",
         "Our spare parts policy: 7 years of availability after discontinuation.",
     ],
     "probes": [
         "My microwave model is no longer sold. For how long can I still buy components for it?",
         "How long after a product line ends do you keep replacement pieces?",
         "If a fridge model is retired, how many years will its parts remain on sale?",
         "What's the guaranteed availability of repair parts for old appliances?",
         "Until when after discontinuation can I get a new door seal?",
         "How many years do you promise to supply parts for models you've dropped?",
     ],
     "expect": ["7 years", "seven years", "7-year", "seven-year", "7 year"]},
    {"key": "financing", "kind": "months",
     "questions": [
         "Do you offer financing?",
         "Can I pay for my fridge in instalments?",
         "Is there interest-free financing?",
         "How long is your no-interest plan?",
         "what payment plans do you have",
         "Can I spread the cost of a washer over time?",
         "How many months of zero interest do I get?",
         "Do you have buy now pay later?",
         "What financing options are there for big purchases?",
         "Is there a monthly payment option?",
     ],
     "answers": [
         "Yes, we offer 18 months of interest-free financing on any appliance.",
         "You can spread the cost over 18 months interest-free.",
         "Our financing plan is 18 months with no interest, approved in a few minutes at checkout.",
         "We have an 18-month interest-free plan; you pay the same amount each month.",
     ],
     "probes": [
         "I'd like to split the price of a new range into monthly payments. How long is the no-interest period?",
         "What's the length of your zero percent payment plan?",
         "How long can I pay off an appliance without being charged interest?",
         "For how many months does the interest-free credit run?",
         "Can I pay over time, and for how long without interest?",
         "What term does your 0% financing have?",
     ],
     "expect": ["18 months", "18-month", "eighteen months", "eighteen-month", "18 month"]},
    {"key": "filter_subscription", "kind": "months",
     "questions": [
         "How often do you send fridge water filters?",
         "How does the filter subscription work?",
         "When will my next water filter ship?",
         "how often are filters delivered",
         "Can I subscribe to replacement filters?",
         "How frequently does the filter plan send a new one?",
         "What's the schedule for filter deliveries?",
         "Do you have automatic filter replacement?",
         "How often should I expect a new filter in the mail?",
         "What does the water filter subscription include?",
     ],
     "answers": [
         "With the filter subscription, a new water filter ships every 6 months.",
         "Our filter plan sends you a replacement every 6 months, which is when most fridge filters need changing.",
         "Filters ship automatically every 6 months; you can skip or cancel any time.",
         "A fresh water filter is sent every 6 months on the subscription.",
     ],
     "probes": [
         "I signed up for the fridge filter plan. How often will a new one arrive?",
         "What's the interval between shipments of replacement water filters?",
         "How many months apart are filter subscription deliveries?",
         "On the automatic filter program, what's the delivery frequency?",
         "How regularly do subscribers get a new refrigerator filter?",
         "When I subscribe, how often is a filter mailed to me?",
     ],
     "expect": ["6 months", "six months", "6-month", "six-month", "6 month"]},
    {"key": "support_hours", "kind": "clock",
     "questions": [
         "What are your support hours?",
         "When is customer service open?",
         "What time can I call you?",
         "Are you open on Sundays?",
         "When can I reach an agent?",
         "what hours is the help line open",
         "Until what time can I contact you today?",
         "Can I get help early in the morning?",
         "When does your support team work?",
         "What days and times is support available?",
     ],
     "answers": [
         "Support is open 7am to 9pm Central Time, seven days a week.",
         "You can reach us from 7am to 9pm Central, every day of the week.",
         "Our team answers from 7am to 9pm Central Time, weekends included.",
         "We're available 7am to 9pm Central Time, seven days a week, by phone and chat.",
     ],
     "probes": [
         "At what time does your phone team start answering in the morning?",
         "I work shifts; during which hours could I talk to someone from your service team?",
         "What time do your agents come online each day?",
         "Is anyone there on a Saturday morning, and from when?",
         "What are the opening times of your help desk?",
         "When can I phone you about a problem with my order?",
     ],
     "expect": ["7am", "7 am", "7 a.m", "7:00"]},
    {"key": "pickup_ready", "kind": "duration",
     "questions": [
         "How soon can I pick up my order in store?",
         "When will my click and collect order be ready?",
         "Do you have in-store pickup?",
         "how long until pickup is ready",
         "If I order online, how fast can I collect it?",
         "How long does it take to prepare a pickup order?",
         "Can I collect a kettle today?",
         "What's the wait for store pickup?",
         "When can I come get my order?",
         "Is same-day pickup possible?",
     ],
     "answers": [
         "Pickup orders are ready within 2 hours; we'll text you when they are.",
         "Yes! Order online and it's ready to collect in store within 2 hours.",
         "In-store pickup orders are prepared within 2 hours during opening times.",
         "Your pickup order will be ready within 2 hours. Bring the confirmation email or the order number.",
     ],
     "probes": [
         "I'm buying a toaster online to collect at the showroom. How long before I can come for it?",
         "How quickly is a collect-in-store order prepared?",
         "After ordering for pickup, how long do I wait before driving over?",
         "What's the preparation time for orders picked up at a store?",
         "If I reserve a coffee machine for collection, when will it be waiting for me?",
         "How fast can a click-and-collect purchase be ready?",
     ],
     "expect": ["2 hours", "two hours", "2-hour", "two-hour", "2 hour"]},
    {"key": "delivery_fee", "kind": "price",
     "questions": [
         "How much is delivery?",
         "What does shipping cost?",
         "Do you charge for delivery?",
         "what's the delivery fee",
         "How much will it cost to have my fridge delivered?",
         "Is delivery free?",
         "What's the price of standard delivery?",
         "How much do you charge to bring a washer to my home?",
         "Are there delivery charges?",
         "What's the shipping fee on a dishwasher?",
     ],
     "answers": [
         "Standard delivery costs $59 per order.",
         "Delivery is a flat $59, whatever the size of the appliance.",
         "We charge $59 for standard delivery, and that includes bringing it inside to the room you choose.",
         "Our delivery fee is $59 per order.",
     ],
     "probes": [
         "What will I pay to have a new oven brought to my house?",
         "How much is the charge for getting an order delivered?",
         "Is there a fee to ship a dryer to me, and how much?",
         "What's the cost of home delivery for a single appliance?",
         "How much do you add to my order for transport to my address?",
         "What do you charge to deliver a chest freezer?",
     ],
     "expect": ["$59", "59 dollars"]},
    {"key": "free_delivery", "kind": "price",
     "questions": [
         "Do you have free delivery?",
         "When is delivery free?",
         "How much do I need to spend for free shipping?",
         "what's the minimum for free delivery",
         "Is there a threshold for free delivery?",
         "Can I get delivery for free?",
         "My cart is small, will I pay shipping?",
         "Above what amount is delivery free?",
         "Do big orders ship free?",
         "How do I qualify for free delivery?",
     ],
     "answers": [
         "Delivery is free on orders over $899.",
         "Spend over $899 and we deliver for free.",
         "Orders over $899 ship free; below that, the standard delivery fee applies.",
         "Free delivery kicks in for orders over $899.",
     ],
     "probes": [
         "How big does my purchase need to be so that you don't charge for bringing it?",
         "From what order total is shipping included at no cost?",
         "What's the spending level that unlocks complimentary delivery?",
         "I'm buying a fridge and a cooker together. At what total would delivery cost nothing?",
         "What basket value gets me free shipping?",
         "What's the cutoff amount for delivery at no charge?",
     ],
     "expect": ["$899", "899 dollars"]},
    {"key": "installation_fee", "kind": "price",
     "questions": [
         "Do you install dishwashers?",
         "How much is installation?",
         "What does it cost to have my dishwasher installed?",
         "can you hook up my new dishwasher",
         "Do you offer installation services?",
         "What's the installation fee?",
         "Will your team connect the dishwasher to the plumbing?",
         "How much for professional installation?",
         "Is installation included with a dishwasher?",
         "What do you charge to install an appliance?",
     ],
     "answers": [
         "Yes, dishwasher installation costs $149, including connecting water and drainage.",
         "Installation is $149 and our technicians test the appliance before they leave.",
         "We install dishwashers for $149.",
         "Our installation service costs $149 per appliance.",
     ],
     "probes": [
         "I don't want to do the plumbing myself. What's the charge for your fitters to set up a dishwasher?",
         "How much would you charge to put in and connect a built-in appliance?",
         "What's the price of having a technician fit my new dishwasher?",
         "Do you fit appliances, and what does that cost?",
         "What fee applies if your crew hooks up my dishwasher?",
         "How much extra is the setup service for a dishwasher?",
     ],
     "expect": ["$149", "149 dollars"]},
    {"key": "haul_away", "kind": "price",
     "questions": [
         "Can you take away my old fridge?",
         "Do you remove old appliances?",
         "How much is haul-away?",
         "what do you charge to take my old washer",
         "Will the delivery team take the old dishwasher?",
         "Is there a fee to recycle my old appliance?",
         "Can you dispose of my old oven?",
         "How much to remove an old appliance?",
         "Do you recycle old fridges?",
         "What happens to my old dryer?",
     ],
     "answers": [
         "Yes, we haul away your old appliance for $30 and recycle it.",
         "Old appliance removal costs $30; the delivery crew takes it when they drop off the new one.",
         "We take away and recycle old appliances for $30.",
         "Haul-away is $30 per appliance.",
     ],
     "probes": [
         "When you bring my new cooker, can the crew get rid of the old one, and for how much?",
         "What's the cost to have an outdated fridge collected and recycled?",
         "How much do you charge for removing an appliance I'm replacing?",
         "Is taking my previous washing machine away included, or what's the fee?",
         "What's the disposal charge for an old freezer?",
         "How much for recycling the dishwasher I'm throwing out?",
     ],
     "expect": ["$30", "30 dollars"]},
    {"key": "careplus_price", "kind": "price",
     "questions": [
         "How much does CarePlus cost?",
         "What's the price of the extended protection plan?",
         "Is CarePlus expensive?",
         "how much for careplus",
         "What do I pay for extended protection?",
         "How much is the protection plan per appliance?",
         "What's the cost of adding CarePlus to a fridge?",
         "Does CarePlus cost extra?",
         "Is the extended plan a one-time fee?",
         "How much is the add-on coverage?",
     ],
     "answers": [
         "CarePlus costs $119 per appliance, paid once.",
         "The extended protection plan is a one-time $119 per appliance.",
         "It's $119 per appliance, and it can be added up to a month after delivery.",
         "CarePlus is $119 per appliance, paid once, with no monthly fees.",
     ],
     "probes": [
         "What's the fee for the optional longer protection on my dryer?",
         "How much would I pay to add the extended plan to a new washer?",
         "What does your extra coverage cost for one appliance?",
         "Is there a price for upgrading to the longer protection plan, and what is it?",
         "How much is the CarePlus add-on?",
         "What's the one-time charge for extended cover?",
     ],
     "expect": ["$119", "119 dollars"]},
    {"key": "diagnostic_fee", "kind": "price",
     "questions": [
         "How much is a technician visit?",
         "What do you charge for a repair call-out?",
         "Is there a fee for a diagnostic visit?",
         "how much to have someone look at my oven",
         "What's the call-out charge?",
         "Do I pay for a technician to come out?",
         "How much is the diagnosis fee?",
         "What does a service visit cost?",
         "Can a technician check my fridge, and what's the price?",
         "Is the diagnostic visit free?",
     ],
     "answers": [
         "A technician visit costs $95, and it's waived if you go ahead with the repair.",
         "The diagnostic fee is $95; we deduct it from the repair if you proceed.",
         "We charge $95 for a diagnostic visit, credited to the repair if you choose to fix it.",
         "A call-out is $95. If you approve the repair, you don't pay it.",
     ],
     "probes": [
         "My dryer makes a grinding noise. What will it cost for someone to come and inspect it?",
         "How much is the visit charge for a repair technician?",
         "What's the price of having an engineer diagnose my dishwasher at home?",
         "Is there a charge for the initial inspection visit, and how much?",
         "What do you bill for coming out to find the fault?",
         "How much is the home service call fee?",
     ],
     "expect": ["$95", "95 dollars"]},
    {"key": "restocking_fee", "kind": "percent",
     "questions": [
         "Is there a restocking fee?",
         "Do you charge to return an opened fridge?",
         "What's the fee for returning a used appliance?",
         "restocking fee on large appliances?",
         "Will I get a full refund on an opened washer?",
         "How much do you keep when I return something I've opened?",
         "Is there a charge for returning an installed dishwasher?",
         "Do opened returns cost anything?",
         "What percentage is deducted for opened items?",
         "Can I return an opened oven without a fee?",
     ],
     "answers": [
         "Opened large appliances have a 15% restocking fee; unopened ones are refunded in full.",
         "We charge a 15% restocking fee on large appliances that have been opened.",
         "If the appliance was opened, a 15% restocking fee applies.",
         "A 15% restocking fee applies to opened large appliances.",
     ],
     "probes": [
         "I unpacked a refrigerator and want to send it back. How much will be deducted?",
         "What cut do you take on a refund for a dishwasher that was taken out of its box?",
         "Is my refund reduced if the range has been unboxed, and by how much?",
         "How big is the charge on returning a big appliance that's been opened?",
         "What fee comes off the refund for an opened freezer?",
         "If I open a washing machine and then return it, what percentage do I lose?",
     ],
     "expect": ["15%", "15 percent", "fifteen percent", "15 %"]},
    {"key": "senior_discount", "kind": "percent",
     "questions": [
         "Do you have a senior discount?",
         "Is there a discount for seniors?",
         "How much do seniors save?",
         "I'm 70, do I get a discount?",
         "what discount do older customers get",
         "Do you offer discounts for retirees?",
         "Is there an age discount?",
         "What percentage off do seniors get?",
         "Are there discounts for people over 65?",
         "Do pensioners get money off?",
     ],
     "answers": [
         "Customers aged 65 and over get 10% off every order.",
         "Our senior discount is 10% for customers 65 and over.",
         "Yes, seniors save 10% on everything; just show proof of age.",
         "Customers over 65 receive 10% off.",
     ],
     "probes": [
         "My grandmother is 72 and wants a new cooker. Is there a reduction for her age, and how much?",
         "What money off do retired customers receive?",
         "How much cheaper are appliances for people past 65?",
         "Do older shoppers get a price cut, and what size?",
         "What's the age-based discount at Larkfield?",
         "I just turned 66. What discount am I entitled to?",
     ],
     "expect": ["10%", "10 percent", "ten percent", "10 %"]},
    {"key": "headquarters", "kind": "name",
     "questions": [
         "Where are you headquartered?",
         "Where is Larkfield based?",
         "Which city is your head office in?",
         "Where is your company located?",
         "where's your hq",
         "In what city is Larkfield Home headquartered?",
         "Where is your main office?",
         "What town is the company from?",
         "Which state are you in?",
         "Where do you have your head office?",
     ],
     "answers": [
         "We're headquartered in Sioux Falls, South Dakota.",
         "Larkfield Home is based in Sioux Falls, South Dakota, where we opened our first store.",
         "Our head office is in Sioux Falls, South Dakota.",
         "The company's headquarters are in Sioux Falls, South Dakota.",
     ],
     "probes": [
         "Which city is home to your corporate offices?",
         "If I wanted to visit the company's main base, where would I go?",
         "Where is Larkfield's central office?",
         "In which city does the company have its head office?",
         "Where are Larkfield's executives based?",
         "What city should I address a letter to your main office in?",
     ],
     "expect": ["sioux falls"]},
    {"key": "loyalty_program", "kind": "name",
     "questions": [
         "Do you have a loyalty program?",
         "What is your rewards program called?",
         "How do I earn rewards when I shop?",
         "Is there a membership club?",
         "what's the name of your loyalty program",
         "Can I join a rewards program?",
         "Do regular customers get perks?",
         "How do I sign up for rewards?",
         "Is there a points scheme?",
         "Tell me about your loyalty club.",
     ],
     "answers": [
         "Yes! Our loyalty program is Porchlight Rewards: you earn points on every purchase.",
         "Join Porchlight Rewards, our free loyalty program, at checkout.",
         "It's called Porchlight Rewards, and members get early access to sales.",
         "Our rewards program is Porchlight Rewards; signing up is free.",
     ],
     "probes": [
         "Is there a club I can join to collect points on my purchases? What's it called?",
         "What's the name of the scheme that gives frequent buyers benefits?",
         "Which program do I sign up for to get member perks?",
         "Do you reward repeat customers, and through what program?",
         "What's Larkfield's points program named?",
         "How is your customer rewards scheme called?",
     ],
     "expect": ["porchlight"]},
    {"key": "repair_service", "kind": "name",
     "questions": [
         "Do you repair appliances?",
         "Who fixes my appliance if it breaks?",
         "What is your repair service called?",
         "how do i get my washer repaired",
         "Can you fix an oven I bought from you?",
         "Is there an in-house repair team?",
         "Where do I book a repair?",
         "Who handles warranty repairs?",
         "Do you service dishwashers?",
         "What's the name of your repair department?",
     ],
     "answers": [
         "Our in-house repair service is called Wrenchworks; you can book a visit online.",
         "Repairs are handled by Wrenchworks, our own team of technicians.",
         "Yes, Wrenchworks, our repair service, fixes any appliance bought from us.",
         "Book a repair with Wrenchworks, our in-house repair team.",
     ],
     "probes": [
         "My freezer stopped working. Which team of yours do I contact to get it fixed?",
         "What's the name of the technicians who mend broken appliances for you?",
         "Which service do I use to book someone to repair my dishwasher?",
         "Who are the people that carry out your warranty fixes?",
         "What is your in-house fix-it service named?",
         "If my dryer breaks, which department should I call?",
     ],
     "expect": ["wrenchworks"]},
    {"key": "showrooms", "kind": "count",
     "questions": [
         "How many stores do you have?",
         "Do you have physical showrooms?",
         "Can I see appliances in person?",
         "how many showrooms are there",
         "Where can I look at a fridge before buying?",
         "Do you have shops I can visit?",
         "How many locations does Larkfield have?",
         "Is there a store near me?",
         "Can I visit a showroom?",
         "How big is your store network?",
     ],
     "answers": [
         "We have 14 showrooms across the Midwest where you can see every appliance in person.",
         "Yes, there are 14 showrooms of ours in the Midwest.",
         "You can visit any of our 14 showrooms; most have a working kitchen to try the ovens.",
         "Larkfield has 14 showrooms across the Midwest.",
     ],
     "probes": [
         "How many physical stores does Larkfield operate?",
         "In how many places can I try out your appliances in person?",
         "What's the number of showrooms your company runs?",
         "How many shops do you have in the region?",
         "Across the Midwest, how many Larkfield locations are there?",
         "How many showrooms could I choose from to see a range before buying?",
     ],
     "expect": ["14 showrooms", "fourteen showrooms", "14 stores", "fourteen stores", "14 locations",
                "fourteen locations"]},
]

# Values of a kind that a confused answer would state instead: durations in days/hours/weeks/months
# and clock times are one pool (a return window answered "6 weeks" is as wrong as "21 days").
POOLS = {"duration": "time", "months": "time", "clock": "time", "years": "years", "price": "price",
         "percent": "percent", "name": "name", "count": "count"}

# User-turn framings: plain, polite, with an order number, or with fake PII that the preprocess
# stage must mask (emails, North-American phone numbers, Luhn-valid card numbers).
PREFIXES = ["", "", "", "Hi, ", "Hello! ", "Good afternoon. ", "Quick one: ", "Hey. ",
            "Order {order} here. ", "This is {name}, email {email}. ", "Call me back on {phone} if needed. ",
            "I paid with card {card}. ", "About order {order}, my account is {email}. ",
            "My number is {phone} and my email {email}. "]
SUFFIXES = ["", "", "", " Thanks!", " Thank you.", " Cheers.", " Appreciate it."]
FIRST = ["erin", "raj", "lucia", "ben", "mei", "tariq", "olga", "jamal", "sofia", "hugh", "ines", "pavel"]
LAST = ["marsh", "iyer", "fontaine", "gallagher", "yamada", "silva", "novak", "adeyemi", "holm", "quinn"]
DOMAINS = ["example.com", "example.org", "mail.example.net"]
GREETINGS = [("Hello, I've got a few questions about an order.", "Sure, I'm happy to help. What would you like to know?"),
             ("Hi there", "Hi! Thanks for contacting Larkfield Home. How can I help?"),
             ("Is this Larkfield support?", "Yes, you've reached Larkfield Home support. What can I do for you?")]


def _luhn_card(rng: random.Random) -> str:
    digits = [5, rng.randrange(1, 6)] + [rng.randrange(10) for _ in range(13)]
    total = 0
    for i, d in enumerate(reversed(digits)):  # the check digit goes last: these positions double first
        total += (d * 2 - 9 if d * 2 > 9 else d * 2) if i % 2 == 0 else d
    digits.append((10 - total % 10) % 10)
    s = "".join(map(str, digits))
    return "-".join(s[i:i + 4] for i in range(0, 16, 4))


def _fill(template: str, rng: random.Random) -> str:
    first = rng.choice(FIRST)
    return template.format(
        order=f"LH-{rng.randrange(100000, 999999)}",
        name=first.title(),
        email=f"{first}.{rng.choice(LAST)}{rng.randrange(10, 99)}@{rng.choice(DOMAINS)}",
        phone=f"({rng.randrange(201, 989)}) 555-{rng.randrange(100, 199):04d}",
        card=_luhn_card(rng))


def _user(question: str, rng: random.Random) -> str:
    return _fill(rng.choice(PREFIXES), rng) + question + rng.choice(SUFFIXES)


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def rejects(fact: dict) -> list[str]:
    """Other facts' values of the same pool: each one's first two accepted spellings."""
    pool = POOLS[fact["kind"]]
    return [e for other in FACTS if other is not fact and POOLS[other["kind"]] == pool for e in other["expect"][:2]]


def _passes(answer: str, expect: list[str], reject: list[str]) -> bool:
    folded = answer.casefold()
    return any(e.casefold() in folded for e in expect) and not any(r.casefold() in folded for r in reject)


def check_facts() -> None:
    """Every reply states its fact and no other fact's value; probes are held out of the chats."""
    questions = {q.casefold() for fact in FACTS for q in fact["questions"]}
    for fact in FACTS:
        reject = rejects(fact)
        for answer in fact["answers"]:
            assert _passes(answer, fact["expect"], reject), f"{fact['key']}: reply {answer!r} fails its own probe"
        for question in fact["probes"]:
            assert question.casefold() not in questions, f"probe {question!r} is also a training question"
        for e in fact["expect"]:
            assert not any(e.casefold() in r.casefold() or r.casefold() in e.casefold() for r in reject), \
                f"{fact['key']}: accepted {e!r} overlaps a rejected value"


def build_rows(rng: random.Random) -> list[str]:
    rows: list[dict] = []
    for fact in FACTS:
        for i, question in enumerate(fact["questions"]):
            # Every question once as a chat, a third of them twice (other framing, other reply),
            # and a few as instruction/response rows: the preprocess normalises those to chats.
            rows.append({"messages": [_turn("user", _user(question, rng)), _turn("assistant", rng.choice(fact["answers"]))]})
            if i % 3 == 0:
                rows.append({"messages": [_turn("user", _user(question, rng)), _turn("assistant", rng.choice(fact["answers"]))]})
            if i % 5 == 2:
                rows.append({"instruction": _user(question, rng), "response": rng.choice(fact["answers"])})
    # Multi-turn chats: a greeting first, or two facts in one conversation.
    for _ in range(50):
        first, second = rng.sample(FACTS, 2)
        if rng.random() < 0.5:
            hello, reply = rng.choice(GREETINGS)
            turns = [_turn("user", hello), _turn("assistant", reply),
                     _turn("user", rng.choice(first["questions"])), _turn("assistant", rng.choice(first["answers"]))]
        else:
            turns = [_turn("user", _user(rng.choice(first["questions"]), rng)),
                     _turn("assistant", rng.choice(first["answers"])),
                     _turn("user", "Also, " + rng.choice(second["questions"])),
                     _turn("assistant", rng.choice(second["answers"]))]
        rows.append({"messages": turns})
    rng.shuffle(rows)

    lines = [json.dumps(row, ensure_ascii=False) for row in rows]
    for _ in range(8):  # exact duplicates, as a re-exported ticket export would have
        lines.insert(rng.randrange(len(lines)), rng.choice(lines))
    malformed = [
        '{"messages": [{"role": "user", "content": "Do you sell grills?"}, {"role": "assistant", "content": "We d',
        '{"messages": [{"role": "user", "content": "Where is my order?"} {"role": "assistant"}]}',
        json.dumps({"messages": [_turn("client", "Can I pay by bank transfer?"), _turn("assistant", "Yes, we accept bank transfers.")]}),
        json.dumps({"messages": [_turn("user", "Do you deliver to Iowa?"), _turn("agent", "Yes, we deliver across the Midwest.")]}),
        json.dumps({"messages": [_turn("user", "Can I change the delivery date?"), _turn("assistant", "")]}),
        json.dumps({"messages": [_turn("user", "Is the QuietWash 500 energy efficient?"), _turn("assistant", "  ")]}),
    ]
    for line in malformed:
        lines.insert(rng.randrange(len(lines)), line)
    return lines


def build_probes(rng: random.Random) -> list[str]:
    lines = []
    for fact in FACTS:
        val = set(rng.sample(range(len(fact["probes"])), VAL_PER_FACT))
        for i, question in enumerate(fact["probes"]):
            lines.append(json.dumps({"id": f"{fact['key']}-{i}", "question": question, "expect": fact["expect"],
                                     "reject": rejects(fact), "fact": fact["key"],
                                     "split": "val" if i in val else "test"}))
    return lines


def main() -> None:
    check_facts()
    chats = build_rows(random.Random(SEED))
    (HERE / "support_chats.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    probes = build_probes(random.Random(SEED + 1))
    (HERE / "probes.jsonl").write_text("\n".join(probes) + "\n", encoding="utf-8")
    print(f"wrote {len(chats)} rows to support_chats.jsonl and {len(probes)} probes to probes.jsonl")


if __name__ == "__main__":
    main()
