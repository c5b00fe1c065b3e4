"""Titles, taglines and overviews of synthetic posters, from per-genre grammars.

Every text is drawn from the caller's random stream, so a poster's texts depend on its seed alone.
The grammars give each genre its own words, so a caption model that sees the genre cues of the image
can beat a model that does not.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

SYNTHETIC_GENRES: tuple[str, ...] = (
    "Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Animation", "Western",
)

# Drama and Comedy dominate real catalogues; the rest stay frequent enough to learn.
_GENRE_WEIGHTS = {"Drama": 2.0, "Comedy": 1.6}
# How many genres a poster gets: mostly one or two, as in IMDb data.
_COUNT_WEIGHTS = (0.45, 0.40, 0.15)

@dataclass(frozen=True)
class _Vocab:
    nouns: tuple[str, ...]  # tagline nouns
    verbs: tuple[str, ...]  # tagline verbs, base form
    adjs: tuple[str, ...]  # tagline adjectives
    heroes: tuple[str, ...]  # overview protagonists, with article
    villains: tuple[str, ...]
    places: tuple[str, ...]
    goals: tuple[str, ...]  # "must <goal>"
    threats: tuple[str, ...]  # "before <villain> <threat>"
    twists: tuple[str, ...]  # second overview sentence
    title_adjs: tuple[str, ...]
    title_nouns: tuple[str, ...]
    taglines: tuple[str, ...]  # templates over {noun} {verb} {adj} {hero} {place}


_VOCAB: dict[str, _Vocab] = {
    "Action": _Vocab(
        nouns=("vengeance", "firepower", "justice", "the mission", "payback", "war", "the countdown", "survival"),
        verbs=("fight", "run", "strike back", "reload", "hit harder", "take cover", "break out", "shoot first"),
        adjs=("explosive", "relentless", "lethal", "unstoppable", "armed", "ruthless", "bulletproof"),
        heroes=("an ex-special forces medic", "a burned-out detective", "a getaway driver", "a rookie bodyguard",
                "a retired assassin", "a demolition expert", "a stunt pilot", "a border patrol agent"),
        villains=("a ruthless arms dealer", "a rogue general", "a cartel boss", "a masked mercenary",
                  "a corrupt police chief", "a hacker syndicate"),
        places=("a hijacked cargo train", "the docks of Marseille", "a skyscraper under lockdown",
                "a desert military base", "the streets of Hong Kong", "an offshore oil rig"),
        goals=("stop a ticking bomb", "rescue a kidnapped witness", "recover stolen warheads", "clear their name",
               "bring down the syndicate", "survive one last job"),
        threats=("levels the city", "sells the launch codes", "wipes out the whole unit", "escapes across the border"),
        twists=("Every bullet counts.", "The only way out is through a hail of gunfire.",
                "Their own agency has put a price on their head.", "Nobody walks away from this one clean."),
        title_adjs=("Lethal", "Maximum", "Final", "Rogue", "Iron", "Critical", "Burning"),
        title_nouns=("Impact", "Strike", "Payback", "Protocol", "Fury", "Velocity", "Siege", "Detonation"),
        taglines=("No rules. No backup. Just {noun}.", "This time, it's {noun}.", "{verb} first. Ask questions later.",
                  "They took everything. Now it's {noun}.", "One {hero}. One chance. No mercy.",
                  "Get ready to {verb}.", "The most {adj} mission ever.", "When the clock runs out, {verb}."),
    ),
    "Comedy": _Vocab(
        nouns=("chaos", "trouble", "a really bad idea", "the wedding", "the weekend", "the neighbours", "karma",
               "the office party", "a llama"),
        verbs=("laugh", "panic", "improvise", "fake it", "dance", "get lucky", "freak out", "wing it"),
        adjs=("ridiculous", "hilarious", "awkward", "clueless", "totally normal", "slightly illegal", "unlucky"),
        heroes=("a hapless substitute teacher", "a slacker roommate", "an overconfident wedding planner",
                "a small-town mascot", "a clumsy intern", "a divorced dad with a food truck"),
        villains=("a smug rival bakery", "the homeowners' association", "an overbearing mother-in-law",
                  "a very competitive neighbour", "a talking parrot with a grudge"),
        places=("a disastrous family reunion", "a budget cruise ship", "a suburban cul-de-sac",
                "a failing summer camp", "a karaoke bar in Ohio"),
        goals=("win the talent show", "save the wedding", "fake a perfect vacation", "return a stolen goat",
               "keep a very small lie from getting bigger"),
        threats=("ruins everything", "tells the whole town", "wins the bake-off again", "finds out the truth"),
        twists=("Nothing goes according to plan.", "Hilarity ensues.",
                "Things get awkward fast.", "The lies pile up faster than the laughs."),
        title_adjs=("Totally", "Big", "Crazy", "Accidental", "Awkward", "Super", "Wild"),
        title_nouns=("Weekend", "Roommates", "Wedding", "Vacation", "Neighbours", "Mix-Up", "Road Trip", "Llama"),
        taglines=("Some ideas are {adj}. This one is worse.", "Just when you thought it was safe to {verb}.",
                  "It's not {noun}. It's family.", "Meet the most {adj} {hero} in town.",
                  "{noun} has never been this {adj}.", "Don't {verb}. Seriously.", "Laugh, {verb}, repeat.",
                  "One weekend. Zero plan. Total {noun}."),
    ),
    "Drama": _Vocab(
        nouns=("the truth", "forgiveness", "home", "a second chance", "silence", "the past", "grief", "hope"),
        verbs=("remember", "let go", "forgive", "stay", "begin again", "hold on", "say goodbye", "carry on"),
        adjs=("quiet", "fragile", "unspoken", "broken", "lasting", "honest", "ordinary"),
        heroes=("a grieving widower", "an estranged daughter", "a young factory worker", "an aging pianist",
                "a small-town nurse", "a disillusioned lawyer", "a retired miner"),
        villains=("an unforgiving past", "a failing family business", "a long-buried secret",
                  "a bitter inheritance dispute", "a closing steel mill"),
        places=("a fading coastal town", "a crowded hospital ward", "the family farm", "a rain-soaked city",
                "a courtroom in 1962"),
        goals=("reconnect with their estranged son", "face the truth about their father", "keep the family together",
               "find a reason to stay", "make peace with the past"),
        threats=("tears the family apart", "comes to light", "takes everything they built", "changes everything"),
        twists=("Some wounds never close.", "Based on a true story.",
                "What they find will change them forever.", "Every family has its silences."),
        title_adjs=("Quiet", "Silent", "Long", "Distant", "Last", "Fragile", "Empty"),
        title_nouns=("Rooms", "Winter", "Shore", "Letters", "Harvest", "Hours", "Bridge", "Promise"),
        taglines=("Some things you never {verb}.", "The hardest part is {noun}.", "Every family has {noun}.",
                  "A {adj} story of {noun}.", "Learning to {verb} takes a lifetime.", "Sometimes {noun} is enough.",
                  "What we choose to {verb} defines us.", "A {adj} life. An extraordinary choice."),
    ),
    "Horror": _Vocab(
        nouns=("the dark", "the basement", "the thing upstairs", "blood", "the dead", "the night", "fear",
               "the whispers"),
        verbs=("scream", "hide", "run", "pray", "bleed", "wake up", "stay quiet", "look back"),
        adjs=("cursed", "haunted", "hungry", "unholy", "silent", "rotten", "buried"),
        heroes=("a skeptical paranormal investigator", "a young nanny", "a college student",
                "a grieving mother", "a night-shift security guard", "a small-town priest"),
        villains=("a demon in the walls", "something beneath the lake", "a masked killer", "a hungry entity",
                  "the ghosts of the asylum", "a cult that never died"),
        places=("an abandoned asylum", "a remote cabin in the woods", "a haunted farmhouse",
                "a crumbling Victorian mansion", "a fog-bound island"),
        goals=("survive until dawn", "break the curse", "escape the house", "find the missing children",
               "send the spirit back"),
        threats=("claims its next victim", "breaks free", "comes for them", "feeds again"),
        twists=("Some doors should stay closed.", "The dead do not rest.",
                "Nobody who enters ever leaves.", "The screams are only the beginning."),
        title_adjs=("Dark", "Hollow", "Cursed", "Bleeding", "Silent", "Rotten", "Black"),
        title_nouns=("Hollow", "Cellar", "Asylum", "Ritual", "Whispers", "Harvest", "Nightmare", "Grave"),
        taglines=("In the dark, no one can hear you {verb}.", "Don't {verb}. It can hear you.",
                  "Something {adj} is waiting in {noun}.", "Pray it doesn't find you.",
                  "You can {verb}, but you can't hide.", "{noun} is coming.", "Never go into {noun} alone.",
                  "Not every {adj} house is empty."),
    ),
    "Romance": _Vocab(
        nouns=("love", "the heart", "a kiss", "forever", "destiny", "a summer romance", "true love", "the one"),
        verbs=("fall in love", "wait", "dream", "kiss", "love again", "say yes", "run away together", "dance"),
        adjs=("unforgettable", "tender", "impossible", "sweet", "star-crossed", "breathless", "endless"),
        heroes=("a shy bookshop owner", "a heartbroken violinist", "a travelling photographer",
                "a young florist", "a widowed baker", "a lonely pen pal"),
        villains=("a disapproving family", "an old flame", "an arranged engagement", "a ticking visa deadline",
                  "a rival suitor"),
        places=("a sunlit Paris apartment", "a seaside village in Italy", "a snowbound ski lodge",
                "a vineyard in Provence", "a bustling New York bakery"),
        goals=("win back their first love", "find the author of a mysterious love letter", "follow their heart",
               "choose between two lovers", "keep a summer promise"),
        threats=("stands between them", "returns to town", "pulls them apart", "breaks their heart"),
        twists=("Love finds a way.", "Sparks fly.",
                "An unexpected romance blossoms.", "Their hearts have other plans."),
        title_adjs=("Sweet", "Endless", "Tender", "Secret", "Summer", "Golden", "Eternal"),
        title_nouns=("Hearts", "Promise", "Kiss", "Letters", "Summer", "Valentine", "Serenade", "Love"),
        taglines=("Some loves are {adj}.", "Two hearts. One {adj} summer.", "They were never meant to {verb}.",
                  "Where {noun} begins.", "An {adj} story of {noun}.", "Every heart deserves to {verb}.",
                  "{noun} was only the beginning.", "It only takes one {adj} moment."),
    ),
    "Sci-Fi": _Vocab(
        nouns=("the stars", "the future", "the signal", "the void", "the machine", "the colony", "tomorrow",
               "the last planet"),
        verbs=("scream", "evolve", "transmit", "launch", "upload", "wake up", "survive", "return to Earth"),
        adjs=("alien", "cosmic", "artificial", "interstellar", "quantum", "galactic", "synthetic"),
        heroes=("a stranded astronaut", "a rogue android", "a starship engineer", "a cybernetic soldier",
                "a young quantum physicist", "the last pilot of the fleet"),
        villains=("a hostile alien swarm", "a rogue artificial intelligence", "a galactic empire",
                  "a time-travelling assassin", "a sentient virus"),
        places=("a dying space station", "a terraformed Mars colony", "the edge of a black hole",
                "a megacity in 2149", "a derelict starship"),
        goals=("decode an alien signal", "save the last colony", "reboot the planetary shield",
               "stop the machines", "find a way home across the galaxy"),
        threats=("reaches Earth", "takes control of the fleet", "rewrites history", "consumes the galaxy"),
        twists=("Humanity's future hangs in the balance.", "The signal is not what it seems.",
                "Time itself begins to unravel.", "The machines are already among us."),
        title_adjs=("Quantum", "Stellar", "Dark", "Infinite", "Neon", "Orbital", "Lost"),
        title_nouns=("Horizon", "Orbit", "Nebula", "Protocol", "Colony", "Eclipse", "Singularity", "Signal"),
        taglines=("In space, no one can hear you {verb}.", "The future is {adj}.", "Beyond {noun}, something waits.",
                  "Humanity's last hope is {adj}.", "Man made {noun}. {noun} made war.",
                  "Prepare to {verb}.", "The {adj} age begins.", "Across {noun}, one {hero} must {verb}."),
    ),
    "Animation": _Vocab(
        nouns=("friendship", "magic", "adventure", "the toys", "the forest", "imagination", "the dragon",
               "the kingdom"),
        verbs=("believe", "dream big", "sing", "fly", "play", "explore", "be brave", "giggle"),
        adjs=("magical", "tiny", "colourful", "brave", "fluffy", "enchanted", "wonderful"),
        heroes=("a curious little robot", "a brave young fox", "a lost baby dragon", "a talking toy car",
                "a shy sea turtle", "a mischievous rabbit"),
        villains=("a grumpy old wizard", "a greedy raccoon king", "a sneaky shadow monster",
                  "an evil toy collector", "a storm spirit"),
        places=("an enchanted forest", "a candy-coloured kingdom", "a toy shop after dark",
                "an underwater city", "a floating island in the clouds"),
        goals=("find the way home", "save the magical kingdom", "make a new friend", "rescue their family",
               "bring colour back to the world"),
        threats=("steals all the colours", "casts a sleeping spell", "captures the forest friends",
                 "freezes the kingdom"),
        twists=("Fun for the whole family.", "Friendship is the greatest magic of all.",
                "Along the way they learn to believe in themselves.", "It's going to be a wild ride."),
        title_adjs=("Little", "Magic", "Tiny", "Super", "Fluffy", "Brave", "Wonder"),
        title_nouns=("Friends", "Kingdom", "Adventure", "Dragon", "Robot", "Treasure", "Island", "Bunny"),
        taglines=("Get ready to {verb}!", "A {adj} adventure for everyone.", "Big dreams come in {adj} packages.",
                  "{noun} starts here.", "Every hero needs {noun}.", "It's time to {verb}!",
                  "The most {adj} {hero} ever.", "Where {noun} comes to life."),
    ),
    "Western": _Vocab(
        nouns=("the frontier", "the law", "gold", "the badge", "the bounty", "the outlaw", "revenge",
               "the last train"),
        verbs=("ride", "draw", "ride alone", "hunt", "settle the score", "hold the line", "ride west", "shoot straight"),
        adjs=("lawless", "dusty", "lonesome", "wild", "hard", "untamed", "sun-scorched"),
        heroes=("a lone gunslinger", "a retired sheriff", "a young cattle drover", "a bounty hunter",
                "a frontier doctor", "a widowed rancher"),
        villains=("a ruthless railroad baron", "a gang of outlaws", "a crooked sheriff", "a notorious bandit",
                  "a band of cattle rustlers"),
        places=("a dusty frontier town", "the badlands of Arizona", "a lonely ranch on the prairie",
                "a silver mining camp", "the Texas border"),
        goals=("bring the outlaws to justice", "protect the homestead", "deliver the gold shipment",
               "avenge their brother", "clean up the town"),
        threats=("takes the town", "rides in at high noon", "burns the ranch", "robs the stagecoach"),
        twists=("Justice comes at high noon.", "The frontier has no mercy.",
                "Only one of them will ride out alive.", "In this town, the law wears a gun."),
        title_adjs=("Lonesome", "Dusty", "Iron", "Wild", "Silver", "Dead", "Red"),
        title_nouns=("Gulch", "Frontier", "Canyon", "Saddle", "Outlaw", "Sheriff", "Trail", "Noon"),
        taglines=("A man has to {verb}.", "Out here, {noun} is all you've got.", "The west was never this {adj}.",
                  "{noun} rides at dawn.", "One {hero}. One town. No {noun}.", "In a {adj} land, {verb}.",
                  "Some men ride for {noun}.", "They came for {noun}. They stayed to {verb}."),
    ),
}

_TITLE_TEMPLATES = ("The {adj} {noun}", "{noun} of the {noun2}", "{adj} {noun}", "The Last {noun}", "{noun} {number}",
                    "Return of the {noun}", "{adj} {noun}: {noun2}", "The {noun}")
_OVERVIEW_TEMPLATES = (
    "In {place}, {hero} must {goal} before {villain} {threat}.",
    "When {villain} {threat}, {hero} sets out to {goal}.",
    "{Hero} has one chance to {goal} in {place}, but {villain} is watching.",
    "After arriving in {place}, {hero} discovers that {villain} {threat} and decides to {goal}.",
)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick_genre(rnd: random.Random, genres: Sequence[str]) -> str:
    """The genre that fills one slot: primary favoured, the others still show up."""
    if len(genres) == 1 or rnd.random() < 0.55:
        return genres[0]
    return rnd.choice(genres[1:])


def make_tagline(rnd: random.Random, genres: Sequence[str]) -> str:
    template = rnd.choice(_VOCAB[genres[0]].taglines)
    fills: dict[str, str] = {}
    for slot, attr in (("noun", "nouns"), ("verb", "verbs"), ("adj", "adjs"), ("hero", "heroes")):
        if "{" + slot + "}" in template:
            word = rnd.choice(getattr(_VOCAB[_pick_genre(rnd, genres)], attr))
            fills[slot] = word.split(" ", 1)[1] if slot == "hero" else word  # drop the article
    text = template.format(**fills)
    # Article agreement: templates say "a"/"an" before a slot whose filler decides which.
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i].lower() in ("a", "an"):
            article = "an" if words[i + 1][:1].lower() in "aeiou" else "a"
            words[i] = _cap(article) if words[i][0].isupper() else article
    text = " ".join(words)
    sentences = text.split(". ")
    return ". ".join(_cap(s) for s in sentences)


def make_overview(rnd: random.Random, genres: Sequence[str]) -> str:
    def vocab(attr: str) -> str:
        return rnd.choice(getattr(_VOCAB[_pick_genre(rnd, genres)], attr))

    first = rnd.choice(_OVERVIEW_TEMPLATES).format(
        place=vocab("places"), hero=vocab("heroes"), Hero=_cap(vocab("heroes")), goal=vocab("goals"),
        villain=vocab("villains"), threat=vocab("threats"))
    first = _cap(first)
    # Multi-genre posters always get a second sentence from another genre, so each genre shows.
    if len(genres) > 1:
        return f"{first} {rnd.choice(_VOCAB[rnd.choice(genres[1:])].twists)}"
    if rnd.random() < 0.6:
        return f"{first} {rnd.choice(_VOCAB[genres[0]].twists)}"
    return first


def make_title(rnd: random.Random, genres: Sequence[str]) -> str:
    template = rnd.choice(_TITLE_TEMPLATES)
    noun = rnd.choice(_VOCAB[_pick_genre(rnd, genres)].title_nouns)
    noun2 = rnd.choice(_VOCAB[_pick_genre(rnd, genres)].title_nouns)
    while noun2 == noun:
        noun2 = rnd.choice(_VOCAB[rnd.choice(list(genres))].title_nouns + ("Night", "Storm", "River"))
    adj = rnd.choice(_VOCAB[_pick_genre(rnd, genres)].title_adjs)
    if adj == noun:  # "The Hollow Hollow"
        adj = "Last"
    return template.format(adj=adj, noun=noun, noun2=noun2, number=rnd.choice(("II", "III", "2", "3", "Zero")))


def sample_genres(rnd: random.Random, genres: Sequence[str]) -> list[str]:
    count_weights = _COUNT_WEIGHTS[: len(genres)]
    k = rnd.choices(range(1, len(count_weights) + 1), weights=count_weights)[0]
    pool = list(genres)
    chosen: list[str] = []
    for _ in range(k):
        g = rnd.choices(pool, weights=[_GENRE_WEIGHTS.get(p, 1.0) for p in pool])[0]
        chosen.append(g)
        pool.remove(g)
    return chosen

