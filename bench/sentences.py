"""Generated English sentences for calibration, evaluation and distillation (no download): ten topics, each with
its own templates and word lists, drawn by a seeded ``random.Random``. Sentences of one topic share vocabulary and
structure, so sentence embeddings have neighbours to agree on; different seeds give different sentences."""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

TOPICS: Dict[str, Tuple[List[str], Dict[str, List[str]]]] = {
    "weather": (
        [
            "{Time} the forecast calls for {weather} across the {region}.",
            "{Weather_adj} winds and {weather} are expected in the {region} {time}.",
            "After a {adj} week, the {region} will see {weather} {time}.",
            "Farmers in the {region} hope the {weather} ends before {time}.",
        ],
        {
            "weather": [
                "heavy rain",
                "light snow",
                "thick fog",
                "thunderstorms",
                "bright sunshine",
                "freezing drizzle",
                "scattered showers",
                "a heat wave",
                "strong hail",
            ],
            "region": [
                "northern valleys",
                "coastal towns",
                "western plains",
                "mountain passes",
                "southern islands",
                "eastern suburbs",
                "river delta",
            ],
            "time": ["this weekend", "on Monday", "tomorrow morning", "later tonight", "next week", "by Friday"],
            "Time": ["This weekend", "On Monday", "Tomorrow morning", "Later tonight", "Next week"],
            "Weather_adj": ["Strong", "Cold", "Gusty", "Warm", "Humid"],
            "adj": ["dry", "wet", "stormy", "calm", "chilly", "sweltering"],
        },
    ),
    "sports": (
        [
            "The {team} beat the {team2} {score} in a {adj} final.",
            "{Player} scored twice as the {team} won the {event}.",
            "Fans cheered when the {team} clinched the {event} after extra time.",
            "The coach of the {team} praised the {adj} defence against the {team2}.",
        ],
        {
            "team": ["home side", "visiting club", "national team", "university squad", "league leaders", "underdogs"],
            "team2": ["defending champions", "city rivals", "newly promoted club", "top seeds", "local favourites"],
            "score": ["two to one", "three to nil", "four to two", "one to nil"],
            "adj": ["dramatic", "tense", "thrilling", "scrappy", "one-sided", "rain-soaked"],
            "Player": ["The young striker", "The veteran captain", "A substitute forward", "The left winger"],
            "event": ["championship", "cup final", "derby", "tournament", "semi-final", "league title"],
        },
    ),
    "cooking": (
        [
            "Add the {ingredient} slowly and stir until the {dish} is {texture}.",
            "Bake the {dish} for {minutes} minutes, then top it with {ingredient}.",
            "The chef recommends the {dish} with {ingredient} and fresh {herb}.",
            "Chop the {herb}, fry the {ingredient} and serve the {dish} {adj}.",
        ],
        {
            "ingredient": [
                "flour",
                "butter",
                "garlic",
                "grated cheese",
                "lemon juice",
                "brown sugar",
                "olive oil",
                "chopped onions",
                "cream",
            ],
            "dish": ["batter", "soup", "risotto", "pie", "stew", "sauce", "bread dough", "omelette"],
            "texture": ["smooth", "thick", "golden", "creamy", "crisp"],
            "minutes": ["twenty", "thirty", "forty", "fifteen"],
            "herb": ["basil", "parsley", "thyme", "rosemary", "coriander"],
            "adj": ["warm", "hot", "chilled", "at once", "with rice"],
        },
    ),
    "finance": (
        [
            "The {market} fell sharply after the {bank} raised interest rates.",
            "Investors worry that {indicator} will remain high {time}.",
            "Shares of the {firm} rose {percent} percent on {adj} earnings.",
            "The {bank} expects {indicator} to ease as the {market} recovers.",
        ],
        {
            "market": ["stock market", "bond market", "housing market", "currency market", "oil market"],
            "bank": ["central bank", "national bank", "reserve board", "finance ministry"],
            "indicator": ["inflation", "unemployment", "borrowing costs", "energy prices", "the trade deficit"],
            "time": ["next year", "this quarter", "for months", "until autumn"],
            "firm": ["carmaker", "software company", "airline", "retail chain", "chip maker", "mining group"],
            "percent": ["three", "five", "eight", "twelve"],
            "adj": ["strong", "weak", "surprising", "record", "disappointing"],
        },
    ),
    "science": (
        [
            "Researchers discovered a new species of {animal} in the {habitat}.",
            "Scientists measured the {quantity} of the {object} at different {places}.",
            "A team of {field} found that the {object} changes {adverb} over time.",
            "The telescope captured {adj} images of a distant {astro}.",
        ],
        {
            "animal": ["frog", "beetle", "orchid bee", "lizard", "deep-sea fish", "bat"],
            "habitat": ["rainforest", "desert", "coral reef", "high mountains", "mangrove swamp"],
            "quantity": ["temperature", "salinity", "pressure", "acidity", "density"],
            "object": ["ocean", "glacier", "lake", "volcano", "atmosphere", "soil"],
            "places": ["depths", "altitudes", "seasons", "latitudes"],
            "field": ["biologists", "physicists", "geologists", "chemists", "astronomers"],
            "adverb": ["slowly", "rapidly", "every decade", "with the seasons"],
            "adj": ["stunning", "sharp", "faint", "detailed"],
            "astro": ["galaxy", "comet", "nebula", "planet", "star cluster"],
        },
    ),
    "travel": (
        [
            "The {vehicle} to the {place} was delayed by {cause}.",
            "Tourists crowded the {place} to see the {sight} at sunset.",
            "We took the {vehicle} along the {route} and stopped at a {stop}.",
            "The {carrier} cancelled dozens of trips to the {place} because of {cause}.",
        ],
        {
            "vehicle": ["night train", "ferry", "coach", "morning flight", "cable car"],
            "place": ["old harbour", "capital", "island", "border town", "ski resort", "national park"],
            "cause": ["the storm", "a strike", "road repairs", "a signal fault", "heavy snow"],
            "sight": ["cathedral", "lighthouse", "waterfall", "castle walls", "old bridge"],
            "route": ["coast road", "mountain pass", "river valley", "scenic railway"],
            "stop": ["small cafe", "fishing village", "roadside market", "viewpoint"],
            "carrier": ["airline", "rail operator", "ferry company", "bus company"],
        },
    ),
    "music": (
        [
            "The {ensemble} performed a {adj} version of the {piece}.",
            "The {musician} practiced the difficult {part} for hours.",
            "Critics praised the {ensemble} for its {adj} reading of the {piece}.",
            "A {musician} played the {piece} on an old {instrument}.",
        ],
        {
            "ensemble": ["orchestra", "string quartet", "jazz band", "choir", "brass ensemble"],
            "adj": ["stunning", "bold", "gentle", "fiery", "moving", "restrained"],
            "piece": ["symphony", "sonata", "folk song", "concerto", "opera overture", "lullaby"],
            "musician": ["violinist", "pianist", "young cellist", "guitarist", "drummer"],
            "part": ["passage", "solo", "cadenza", "opening bars"],
            "instrument": ["piano", "violin", "harpsichord", "organ", "guitar"],
        },
    ),
    "health": (
        [
            "Doctors advise {habit} during {condition}.",
            "The patient recovered {adverb} after the {treatment}.",
            "A new study links {habit} to lower rates of {illness}.",
            "Nurses at the {clinic} reported fewer cases of {illness} {time}.",
        ],
        {
            "habit": [
                "drinking water regularly",
                "walking every day",
                "sleeping eight hours",
                "eating more fibre",
                "washing hands often",
            ],
            "condition": ["hot weather", "the flu season", "long flights", "exam weeks"],
            "adverb": ["quickly", "slowly", "fully", "within days"],
            "treatment": ["surgery", "physiotherapy", "new medication", "a short hospital stay"],
            "illness": ["heart disease", "diabetes", "influenza", "back pain", "asthma"],
            "clinic": ["village clinic", "city hospital", "children's ward", "health centre"],
            "time": ["this winter", "last month", "since spring"],
        },
    ),
    "technology": (
        [
            "The {software} update fixes several {problem}.",
            "Engineers tested the new {device} in {condition}.",
            "The {company} announced plans to hire {number} new {staff}.",
            "Users complained that the {device} {fault} after the {software} update.",
        ],
        {
            "software": ["operating system", "browser", "banking app", "firmware", "messaging app"],
            "problem": ["security vulnerabilities", "battery bugs", "crashes", "display glitches"],
            "device": ["engine", "smartphone", "battery", "drone", "laptop", "router"],
            "condition": ["extreme cold", "high humidity", "heavy traffic", "strong vibration"],
            "company": ["startup", "chip maker", "software company", "telecom operator"],
            "number": ["five hundred", "two hundred", "a thousand", "fifty"],
            "staff": ["engineers", "designers", "researchers", "support staff"],
            "fault": ["overheats", "restarts at random", "drains its battery", "loses its connection"],
        },
    ),
    "home": (
        [
            "My {relative} grows {plant} in a small {garden}.",
            "The children were playing {game} in the {yard} until sunset.",
            "Our neighbours planted {plant} in their {yard}.",
            "{Relative} forgot the {item} at the {location} again.",
        ],
        {
            "relative": ["grandmother", "uncle", "sister", "neighbour", "father"],
            "Relative": ["My brother", "Our aunt", "Grandfather", "The babysitter"],
            "plant": ["tomatoes and peppers", "an apple tree", "roses", "herbs", "sunflowers"],
            "garden": ["garden", "greenhouse", "balcony pot", "allotment"],
            "game": ["football", "hide and seek", "tag", "cricket"],
            "yard": ["park", "backyard", "street", "school field"],
            "item": ["umbrella", "house keys", "shopping list", "lunch box"],
            "location": ["train station", "bakery", "office", "library"],
        },
    ),
}


def _fill(template: str, words: Dict[str, List[str]], rng: random.Random) -> str:
    out = template
    while "{" in out:
        start = out.index("{")
        end = out.index("}", start)
        key = out[start + 1 : end]
        key2 = key.rstrip("2")  # {team2}: a second draw from its own list
        choices = words.get(key) or words[key2]
        out = out[:start] + rng.choice(choices) + out[end + 1 :]
    return out


def sentences(count: int, seed: int) -> List[str]:
    """``count`` distinct generated sentences (topics in turn), reproducible from ``seed``."""
    rng = random.Random(seed)
    names = sorted(TOPICS)
    out: List[str] = []
    seen = set()
    tries = 0
    while len(out) < count:
        templates, words = TOPICS[names[len(out) % len(names)]]
        text = _fill(rng.choice(templates), words, rng)
        tries += 1
        if text not in seen or tries > 50 * count:
            seen.add(text)
            out.append(text)
    return out
