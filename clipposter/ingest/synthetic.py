"""Genre-conditioned synthetic movie posters, so the whole pipeline runs offline.

`generate_posters` draws n posters with 1-3 genres each, writes them as JPEGs plus a
manifest.csv, and returns the records. Genre cues are deliberately coarse and global (palette
of large areas, big shapes), so even a small random-weight image encoder at low resolution
carries enough genre signal for a linear probe; taglines and overviews come from per-genre
grammars so a caption model conditioned on the image can beat chance.

Everything about poster i is a function of (seed, i) alone: reruns are byte-identical, and a
resumed run skips posters whose files already exist without changing any record.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipposter.errors import ClipposterError
from clipposter.records import PosterRecord, assign_splits

SYNTHETIC_GENRES: tuple[str, ...] = (
    "Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi", "Animation", "Western",
)

MANIFEST_COLUMNS = ("id", "image", "genres", "tagline", "overview", "title", "split")
JPEG_QUALITY = 90

# Drama and Comedy dominate real catalogues; the rest stay frequent enough to learn.
_GENRE_WEIGHTS = {"Drama": 2.0, "Comedy": 1.6}
# How many genres a poster gets: mostly one or two, as in IMDb data.
_COUNT_WEIGHTS = (0.45, 0.40, 0.15)

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Palette:
    top: RGB  # background gradient, top colour
    bottom: RGB  # background gradient, bottom colour
    accents: tuple[RGB, ...]  # shape colours
    ink: RGB  # title-band colour when this genre is the primary one


_PALETTES: dict[str, _Palette] = {
    "Action": _Palette((190, 30, 15), (255, 140, 0), ((255, 230, 60), (255, 255, 240), (30, 20, 20)), (40, 10, 5)),
    "Comedy": _Palette((255, 215, 30), (255, 245, 150), ((255, 70, 150), (30, 160, 255), (255, 255, 255)), (60, 50, 0)),
    "Drama": _Palette((65, 80, 105), (150, 160, 178), ((22, 26, 36), (200, 205, 215)), (20, 24, 32)),
    "Horror": _Palette((8, 0, 0), (115, 0, 12), ((210, 0, 0), (230, 228, 215), (0, 0, 0)), (0, 0, 0)),
    "Romance": _Palette((255, 180, 210), (245, 95, 150), ((220, 15, 75), (255, 255, 255), (255, 215, 230)), (90, 10, 40)),
    "Sci-Fi": _Palette((0, 8, 55), (0, 190, 215), ((0, 255, 255), (150, 80, 255), (235, 250, 255)), (0, 10, 35)),
    "Western": _Palette((250, 165, 50), (125, 62, 20), ((255, 225, 100), (55, 95, 40), (85, 45, 15)), (50, 25, 5)),
    "Animation": _Palette((40, 190, 255), (130, 255, 90),
                          ((255, 0, 200), (255, 230, 0), (0, 220, 120), (255, 110, 0), (120, 60, 255)), (30, 0, 80)),
}


# ----------------------------------------------------------------------------- texts

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


def _make_tagline(rnd: random.Random, genres: Sequence[str]) -> str:
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


def _make_overview(rnd: random.Random, genres: Sequence[str]) -> str:
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


def _make_title(rnd: random.Random, genres: Sequence[str]) -> str:
    template = rnd.choice(_TITLE_TEMPLATES)
    noun = rnd.choice(_VOCAB[_pick_genre(rnd, genres)].title_nouns)
    noun2 = rnd.choice(_VOCAB[_pick_genre(rnd, genres)].title_nouns)
    while noun2 == noun:
        noun2 = rnd.choice(_VOCAB[rnd.choice(list(genres))].title_nouns + ("Night", "Storm", "River"))
    adj = rnd.choice(_VOCAB[_pick_genre(rnd, genres)].title_adjs)
    if adj == noun:  # "The Hollow Hollow"
        adj = "Last"
    return template.format(adj=adj, noun=noun, noun2=noun2, number=rnd.choice(("II", "III", "2", "3", "Zero")))


def _sample_genres(rnd: random.Random, genres: Sequence[str]) -> list[str]:
    count_weights = _COUNT_WEIGHTS[: len(genres)]
    k = rnd.choices(range(1, len(count_weights) + 1), weights=count_weights)[0]
    pool = list(genres)
    chosen: list[str] = []
    for _ in range(k):
        g = rnd.choices(pool, weights=[_GENRE_WEIGHTS.get(p, 1.0) for p in pool])[0]
        chosen.append(g)
        pool.remove(g)
    return chosen


# ----------------------------------------------------------------------------- images

def _jitter(rnd: random.Random, color: RGB, amount: int = 18) -> RGB:
    return tuple(max(0, min(255, c + rnd.randint(-amount, amount))) for c in color)  # type: ignore[return-value]


def _gradient(rnd: random.Random, pal: _Palette, w: int, h: int) -> np.ndarray:
    """A vertical gradient with a random tilt, as float32 HxWx3."""
    top = np.array(_jitter(rnd, pal.top), dtype=np.float32)
    bottom = np.array(_jitter(rnd, pal.bottom), dtype=np.float32)
    tilt = rnd.uniform(-0.35, 0.35)
    ys = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :]
    t = np.clip(ys + tilt * xs, 0.0, 1.0)[..., None]
    return top * (1.0 - t) + bottom * t


def _heart(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill: RGB) -> None:
    draw.ellipse((cx - r, cy - r * 0.6, cx, cy + r * 0.4), fill=fill)
    draw.ellipse((cx, cy - r * 0.6, cx + r, cy + r * 0.4), fill=fill)
    draw.polygon([(cx - r * 0.97, cy), (cx + r * 0.97, cy), (cx, cy + r * 1.15)], fill=fill)


def _star(cx: float, cy: float, r_out: float, r_in: float, points: int, phase: float) -> list[tuple[float, float]]:
    out = []
    for j in range(points * 2):
        r = r_out if j % 2 == 0 else r_in
        a = phase + math.pi * j / points
        out.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return out


def _draw_action(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Diagonal stripes across the whole band, then an explosion burst.
    slope = rnd.choice((-1, 1)) * rnd.uniform(0.6, 1.4)
    width = rnd.uniform(0.08, 0.14) * w
    x = -h * abs(slope) + rnd.uniform(0, width)
    while x < w + h * abs(slope):
        color = _jitter(rnd, rnd.choice(pal.accents[:2]), 20)
        dx = h * slope
        draw.polygon([(x, 0), (x + width, 0), (x + width + dx, h), (x + dx, h)], fill=color)
        x += width * rnd.uniform(2.2, 3.2)
    cx, cy = rnd.uniform(0.3, 0.7) * w, rnd.uniform(0.35, 0.65) * h
    r = rnd.uniform(0.3, 0.45) * min(w, h * 1.3)
    phase = rnd.uniform(0, math.pi)
    points = rnd.randint(9, 14)
    draw.polygon(_star(cx, cy, r, r * 0.55, points, phase), fill=_jitter(rnd, (255, 120, 0)))
    draw.polygon(_star(cx, cy, r * 0.65, r * 0.35, points, phase + 0.2), fill=_jitter(rnd, (255, 235, 80)))


def _draw_comedy(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Big polka dots on a loose grid.
    step = rnd.uniform(0.24, 0.32) * w
    r = step * rnd.uniform(0.28, 0.36)
    colors = [_jitter(rnd, c) for c in pal.accents]
    row = 0
    y = rnd.uniform(0, step / 2)
    while y < h + r:
        x = (step / 2 if row % 2 else 0) + rnd.uniform(-step * 0.1, step * 0.1)
        while x < w + r:
            rr = r * rnd.uniform(0.85, 1.15)
            draw.ellipse((x - rr, y - rr, x + rr, y + rr), fill=rnd.choice(colors))
            x += step
        y += step * 0.87
        row += 1


def _draw_drama(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # One large dark silhouette: a tall block with a head, standing on a floor line.
    body_w = rnd.uniform(0.32, 0.48) * w
    cx = rnd.uniform(0.3, 0.7) * w
    top = rnd.uniform(0.3, 0.45) * h
    color = _jitter(rnd, pal.accents[0], 10)
    draw.rectangle((cx - body_w / 2, top, cx + body_w / 2, h), fill=color)
    head = body_w * rnd.uniform(0.28, 0.36)
    draw.ellipse((cx - head, top - head * 1.9, cx + head, top + head * 0.1), fill=color)
    wx = rnd.choice((0.05, 0.6)) * w
    draw.rectangle((wx, 0.12 * h, wx + 0.3 * w, 0.12 * h + 0.18 * h), outline=_jitter(rnd, pal.accents[1]), width=2)


def _draw_horror(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Pale moon, jagged black spikes rising from below, a red crack.
    mr = rnd.uniform(0.1, 0.16) * w
    mx, my = rnd.uniform(0.2, 0.8) * w, rnd.uniform(0.15, 0.35) * h
    draw.ellipse((mx - mr, my - mr, mx + mr, my + mr), fill=_jitter(rnd, pal.accents[1], 10))
    pts = [(0.0, float(h))]
    x = 0.0
    while x < w:
        x += rnd.uniform(0.06, 0.14) * w
        pts.append((x - rnd.uniform(0.02, 0.05) * w, h * rnd.uniform(0.25, 0.6)))
        pts.append((x, h * rnd.uniform(0.75, 0.95)))
    pts.append((float(w), float(h)))
    draw.polygon(pts, fill=_jitter(rnd, pal.accents[2], 6))
    x, y = rnd.uniform(0.2, 0.8) * w, 0.0
    crack = [(x, y)]
    while y < h * 0.8:
        x += rnd.uniform(-0.12, 0.12) * w
        y += rnd.uniform(0.08, 0.16) * h
        crack.append((x, y))
    draw.line(crack, fill=_jitter(rnd, pal.accents[0]), width=max(2, w // 40))


def _draw_romance(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Soft bokeh circles behind one to three large hearts.
    for _ in range(rnd.randint(5, 9)):
        r = rnd.uniform(0.06, 0.14) * w
        x, y = rnd.uniform(0, w), rnd.uniform(0, h)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_jitter(rnd, pal.accents[2], 12))
    for _ in range(rnd.randint(1, 3)):
        r = rnd.uniform(0.18, 0.3) * min(w, h * 1.2)
        _heart(draw, rnd.uniform(0.25, 0.75) * w, rnd.uniform(0.3, 0.6) * h, r, _jitter(rnd, pal.accents[0]))


def _draw_scifi(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Stars, a ringed planet and a perspective grid floor.
    for _ in range(rnd.randint(15, 30)):
        x, y = rnd.uniform(0, w), rnd.uniform(0, h * 0.6)
        draw.rectangle((x, y, x + 1, y + 1), fill=pal.accents[2])
    pr = rnd.uniform(0.18, 0.28) * w
    px, py = rnd.uniform(0.25, 0.75) * w, rnd.uniform(0.2, 0.4) * h
    draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=_jitter(rnd, pal.accents[1]))
    draw.ellipse((px - pr * 1.7, py - pr * 0.35, px + pr * 1.7, py + pr * 0.35), outline=_jitter(rnd, pal.accents[0]),
                 width=max(2, w // 60))
    horizon = rnd.uniform(0.55, 0.7) * h
    grid = _jitter(rnd, pal.accents[0], 10)
    vx = rnd.uniform(0.35, 0.65) * w
    for j in range(-6, 7):
        draw.line([(vx, horizon), (vx + j * w * 0.25, h)], fill=grid, width=1)
    y, gap = horizon, (h - horizon) * 0.06
    while y < h:
        draw.line([(0, y), (w, y)], fill=grid, width=1)
        gap *= 1.45
        y += gap


def _draw_western(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Low sun sinking into a horizon, mesas, a brown ground and saguaro cacti.
    horizon = rnd.uniform(0.55, 0.7) * h
    sr = rnd.uniform(0.2, 0.3) * w
    sx = rnd.uniform(0.3, 0.7) * w
    draw.ellipse((sx - sr, horizon - sr * 1.2, sx + sr, horizon + sr * 0.8), fill=_jitter(rnd, pal.accents[0]))
    ground = _jitter(rnd, pal.accents[2], 12)
    mx = rnd.uniform(-0.1, 0.5) * w
    mw = rnd.uniform(0.3, 0.5) * w
    mh = rnd.uniform(0.1, 0.18) * h
    draw.polygon([(mx, horizon), (mx + mw * 0.2, horizon - mh), (mx + mw * 0.8, horizon - mh), (mx + mw, horizon)],
                 fill=ground)
    draw.rectangle((0, horizon, w, h), fill=ground)
    cactus = _jitter(rnd, pal.accents[1], 12)
    for _ in range(rnd.randint(1, 2)):
        cx = rnd.uniform(0.1, 0.9) * w
        cw = rnd.uniform(0.06, 0.09) * w
        ctop = horizon - rnd.uniform(0.2, 0.35) * h
        base = horizon + rnd.uniform(0.05, 0.15) * (h - horizon)
        draw.rounded_rectangle((cx - cw / 2, ctop, cx + cw / 2, base), radius=cw / 2, fill=cactus)
        arm_y = ctop + (base - ctop) * rnd.uniform(0.3, 0.5)
        draw.rounded_rectangle((cx - cw * 2, arm_y, cx, arm_y + cw * 0.8), radius=cw / 3, fill=cactus)
        draw.rounded_rectangle((cx - cw * 2, arm_y - cw * 1.6, cx - cw * 1.2, arm_y + cw * 0.8), radius=cw / 3,
                               fill=cactus)


def _draw_animation(draw: ImageDraw.ImageDraw, rnd: random.Random, w: int, h: int, pal: _Palette) -> None:
    # Overlapping rounded blobs in saturated colours with cartoon outlines.
    outline = max(2, w // 70)
    for _ in range(rnd.randint(4, 7)):
        bw, bh = rnd.uniform(0.25, 0.5) * w, rnd.uniform(0.2, 0.45) * h
        x, y = rnd.uniform(-0.1, 0.9) * w - bw / 2, rnd.uniform(0.0, 1.0) * h - bh / 2
        color = _jitter(rnd, rnd.choice(pal.accents), 15)
        if rnd.random() < 0.5:
            draw.ellipse((x, y, x + bw, y + bh), fill=color, outline=(20, 20, 30), width=outline)
        else:
            draw.rounded_rectangle((x, y, x + bw, y + bh), radius=min(bw, bh) / 2.5, fill=color,
                                   outline=(20, 20, 30), width=outline)
    # A pair of googly eyes on the scene, the cheapest "character" cue.
    ex, ey, er = rnd.uniform(0.3, 0.7) * w, rnd.uniform(0.3, 0.7) * h, rnd.uniform(0.06, 0.09) * w
    for dx in (-er * 1.1, er * 1.1):
        draw.ellipse((ex + dx - er, ey - er, ex + dx + er, ey + er), fill=(255, 255, 255), outline=(20, 20, 30),
                     width=outline)
        draw.ellipse((ex + dx - er * 0.4, ey - er * 0.2, ex + dx + er * 0.4, ey + er * 0.6), fill=(20, 20, 30))


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, random.Random, int, int, _Palette], None]] = {
    "Action": _draw_action, "Comedy": _draw_comedy, "Drama": _draw_drama, "Horror": _draw_horror,
    "Romance": _draw_romance, "Sci-Fi": _draw_scifi, "Western": _draw_western, "Animation": _draw_animation,
}


def _vignette(arr: np.ndarray, strength: float) -> np.ndarray:
    h, w = arr.shape[:2]
    ys = np.linspace(-1.0, 1.0, h, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)[None, :]
    mask = 1.0 - strength * np.clip((xs ** 2 + ys ** 2) / 1.6, 0.0, 1.0)
    return arr * mask[..., None]


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _draw_title(img: Image.Image, band_top: int, title: str, pal: _Palette, rnd: random.Random) -> None:
    w, h = img.size
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, band_top, w, h), fill=_jitter(rnd, pal.ink, 10))
    text = title.upper()
    size = max(8, int((h - band_top) * 0.42))
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > w * 0.92:
        size -= 1
        font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (w - (right - left)) / 2 - left
    y = band_top + ((h - band_top) - (bottom - top)) / 2 - top
    draw.text((x, y), text, font=font, fill=(245, 240, 230))


def _band_edges(rnd: random.Random, k: int, height: int) -> list[int]:
    """k+1 band edges over [0, height], equal shares with jitter so layouts vary."""
    edges = [0]
    for j in range(1, k):
        edges.append(int(round(height * (j / k + rnd.uniform(-0.06, 0.06)))))
    edges.append(height)
    return edges


def _render(rnd: random.Random, genres: Sequence[str], title: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    title_top = int(round(h * rnd.uniform(0.82, 0.86)))
    primary = _PALETTES[genres[0]]
    base = _gradient(rnd, primary, w, title_top)
    img = Image.new("RGB", (w, h))
    edges = _band_edges(rnd, len(genres), title_top)
    for j, genre in enumerate(genres):
        y0, y1 = edges[j], edges[j + 1]
        pal = _PALETTES[genre]
        band = base[y0:y1]
        if j > 0:  # the band's own genre tints it strongly, the primary background still shows
            alpha = rnd.uniform(0.7, 0.85)
            band = band * (1 - alpha) + _gradient(rnd, pal, w, y1 - y0) * alpha
        tile = Image.fromarray(np.clip(band, 0, 255).astype(np.uint8), "RGB")
        _DRAWERS[genre](ImageDraw.Draw(tile), rnd, w, y1 - y0, pal)
        if genre == "Horror":
            tile = Image.fromarray(np.clip(_vignette(np.asarray(tile, dtype=np.float32), 0.75), 0, 255)
                                   .astype(np.uint8), "RGB")
        img.paste(tile, (0, y0))
    # Global colour jitter and grain so no two posters of a genre share exact pixel statistics.
    noise_rng = np.random.default_rng(rnd.getrandbits(64))
    arr = np.asarray(img, dtype=np.float32)
    arr = arr * rnd.uniform(0.88, 1.08) + np.array([rnd.uniform(-10, 10) for _ in range(3)], dtype=np.float32)
    arr += noise_rng.normal(0.0, 5.0, size=arr.shape).astype(np.float32)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    _draw_title(img, title_top, title, primary, rnd)
    return img


# ----------------------------------------------------------------------------- files

def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file so an interrupted run never leaves a truncated file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(records: Iterable[PosterRecord], path: str | os.PathLike) -> Path:
    """Write records as manifest.csv (id,image,genres,tagline,overview,title,split).

    Image paths are written relative to the manifest's folder when they live under it, so the
    folder can be moved as a whole. The file is left untouched when its content would not change.
    """
    path = Path(path)
    root = path.parent.resolve()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for rec in records:
        image = rec.image or ""
        if image:
            with contextlib.suppress(ValueError):  # outside the manifest folder: keep the path as given
                image = Path(image).resolve().relative_to(root).as_posix()
        writer.writerow([rec.id, image, "|".join(rec.genres), rec.tagline or "", rec.overview or "",
                         rec.title or "", rec.split or ""])
    data = buf.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not (path.exists() and path.read_bytes() == data):
        _atomic_write(path, data)
    return path


def _poster_rng(seed: int, index: int) -> random.Random:
    # String seeding hashes with SHA-512: stable across Python versions and platforms.
    return random.Random(f"clipposter-synthetic:{seed}:{index}")


def generate_posters(out_dir: str | os.PathLike, n: int = 200, seed: int = 0, size: tuple[int, int] = (200, 300),
                     genres: Sequence[str] = SYNTHETIC_GENRES, progress: bool = False) -> list[PosterRecord]:
    """Write n synthetic posters to out_dir/posters/<id>.jpg and out_dir/manifest.csv.

    `size` is (width, height). Same seed gives byte-identical files and identical records; an
    existing poster file is kept as is, so an interrupted run can simply be started again.
    Returns the records with absolute image paths and seeded splits.
    """
    genres = tuple(genres)
    unknown = [g for g in genres if g not in _PALETTES]
    if unknown:
        raise ClipposterError(f"synthetic posters know only {', '.join(SYNTHETIC_GENRES)}; got {', '.join(unknown)}")
    if not genres:
        raise ClipposterError("synthetic posters need at least one genre")
    if n < 0:
        raise ClipposterError(f"number of posters must be >= 0, got {n}")
    w, h = int(size[0]), int(size[1])
    if w < 32 or h < 32:
        raise ClipposterError(f"poster size must be at least 32x32, got {w}x{h}")

    out = Path(out_dir).resolve()
    poster_dir = out / "posters"
    poster_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(max(n - 1, 0))))

    indices: Iterable[int] = range(n)
    if progress:
        try:
            from tqdm import tqdm

            indices = tqdm(indices, total=n, desc="synthetic posters", unit="poster")
        except ImportError:
            print(f"generating {n} synthetic posters in {out}", file=sys.stderr)

    records: list[PosterRecord] = []
    for i in indices:
        rnd = _poster_rng(seed, i)
        chosen = _sample_genres(rnd, genres)
        title = _make_title(rnd, chosen)
        tagline = _make_tagline(rnd, chosen)
        overview = _make_overview(rnd, chosen)
        rec_id = f"syn-{i:0{width}d}"
        image_path = poster_dir / f"{rec_id}.jpg"
        if not image_path.exists():
            # Rendering draws from its own stream, so skipping it never shifts the texts.
            img = _render(random.Random(rnd.getrandbits(64)), chosen, title, (w, h))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=JPEG_QUALITY)
            _atomic_write(image_path, buf.getvalue())
        records.append(PosterRecord(id=rec_id, image=str(image_path), genres=chosen, tagline=tagline,
                                    overview=overview, title=title))
    assign_splits(records, seed=seed)
    write_manifest(records, out / "manifest.csv")
    return records
