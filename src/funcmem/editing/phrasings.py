"""The language of the editing task family: how people ask for each edit, and the checks that keep
the held-out wording honest.

Every edit has training phrasings (composed here from verb phrases and objects, at least 30) and
held-out phrasings (written one by one, at least 6) that use **none of another edit's keywords**:
an edit's keywords are the content words of all its phrasings (``keywords``), so a held-out
phrasing can only be understood, not matched on a word that another edit owns ("make the darks
darker and the lights lighter" is not a held-out phrasing of contrast_up: *dark* and *light*
belong to darken and brighten). ``check_language`` enforces this.

Phrasings carry no strength or value: ``funcmem.editing.tasks`` appends those ("... by 40%",
"... slightly") and fills the colour slot ``{colour}`` of tint.

The base editor's own language (``funcmem.editing.pretrain``) must not contain any benchmark
keyword either (``check_base_language``), so the frozen base never learns the benchmark's words.
"""

from __future__ import annotations

import re
from itertools import product

# ---------------------------------------------------------------- words that are no edit's keyword

GENERIC = frozenset("""
a an the it its it's this that these those of to in on at by for with into onto from up down out over toward
off and then please some more less much bit little lot very too so all whole entire every everything
image images photo photos photograph picture pictures pic shot frame scene version one
make makes made give add apply remove reduce increase decrease raise lower boost turn put set let get
bring do be is are was look looks like feel feels effect filter tone tones tonality color colors colour
colours percent px pixel pixels radius strength amount slightly strongly subtly heavily
""".split())

OBJECTS = ("it", "the photo", "the image", "this picture")  # what a training phrase is about


def _compose(templates: list[str]) -> tuple[str, ...]:
    """Every template with every object in ``OBJECTS`` ({obj}); a template without {obj} once."""
    out = []
    for t, obj in product(templates, OBJECTS):
        text = t.format(obj=obj, colour="{colour}")
        if text not in out:
            out.append(text)
    return tuple(out)


# ---------------------------------------------------------------- the phrasings

TRAIN: dict[str, tuple[str, ...]] = {
    "blur": _compose([
        "blur {obj}", "make {obj} blurry", "make {obj} blurrier", "add blur to {obj}",
        "apply a gaussian blur to {obj}", "soften the focus of {obj}", "put {obj} out of focus",
        "give {obj} a blurred look", "make {obj} less crisp"]),
    "sharpen": _compose([
        "sharpen {obj}", "make {obj} sharper", "add sharpness to {obj}", "enhance the edges in {obj}",
        "make the edges of {obj} crisper", "apply an unsharp mask to {obj}", "make {obj} crisp",
        "bring out the fine detail in {obj}", "increase the sharpness of {obj}"]),
    "add_noise": _compose([
        "add noise to {obj}", "make {obj} noisy", "make {obj} grainy", "add film grain to {obj}",
        "add some grain to {obj}", "put grain on {obj}", "add a noise pattern to {obj}",
        "give {obj} a noisy texture", "sprinkle grain over {obj}"]),
    "denoise": _compose([
        "denoise {obj}", "remove the noise from {obj}", "clean the grain out of {obj}", "make {obj} less noisy",
        "reduce the noise in {obj}", "get rid of the grain in {obj}", "remove the grain from {obj}",
        "filter the noise out of {obj}", "make {obj} clean and noise free"]),
    "age": _compose([
        "make {obj} look old", "age {obj}", "give {obj} a vintage look", "make {obj} look like an old damaged photo",
        "turn {obj} into an antique photograph", "make {obj} look aged and worn", "add an old photo effect to {obj}",
        "make {obj} look like a vintage print", "give {obj} a worn antique feel"]),
    "restore": _compose([
        "restore {obj}", "repair {obj}", "remove the scratches from {obj}", "undo the aging of {obj}",
        "fix the old damage in {obj}", "bring {obj} back to its original state", "make {obj} look new again",
        "repair the scratches and fading in {obj}", "remove the fading and stains from {obj}"]),
    "brighten": _compose([
        "make {obj} brighter", "brighten {obj}", "increase the brightness of {obj}", "lighten {obj}",
        "raise the exposure of {obj}", "make {obj} lighter", "boost the brightness of {obj}",
        "add light to {obj}", "make {obj} less dim"]),
    "darken": _compose([
        "make {obj} darker", "darken {obj}", "decrease the brightness of {obj}", "dim {obj}",
        "lower the exposure of {obj}", "make {obj} less bright", "reduce the light in {obj}",
        "underexpose {obj}", "make {obj} dimmer"]),
    "contrast_up": _compose([
        "increase the contrast of {obj}", "add contrast to {obj}", "make {obj} more contrasty",
        "boost the contrast of {obj}", "raise the contrast of {obj}", "make the colors of {obj} pop",
        "give {obj} more contrast", "make {obj} punchier", "strengthen the contrast in {obj}"]),
    "contrast_down": _compose([
        "decrease the contrast of {obj}", "reduce the contrast of {obj}", "make {obj} less contrasty",
        "lower the contrast of {obj}", "flatten the contrast of {obj}", "make {obj} look flatter",
        "soften the contrast of {obj}", "give {obj} a washed out look", "mute the contrast in {obj}"]),
    "warmer": _compose([
        "make {obj} warmer", "warm up {obj}", "increase the color temperature of {obj}", "give {obj} a warmer tone",
        "add warmth to {obj}", "shift the colors of {obj} toward warm", "make the colors of {obj} warmer",
        "add a warm cast to {obj}", "heat up the colors of {obj}"]),
    "cooler": _compose([
        "make {obj} cooler", "cool down {obj}", "make {obj} colder", "decrease the color temperature of {obj}",
        "give {obj} a cooler tone", "add a cool cast to {obj}", "shift the colors of {obj} toward cool",
        "make the colors of {obj} colder", "chill the colors of {obj}"]),
    "saturate": _compose([
        "make {obj} more saturated", "saturate {obj}", "boost the saturation of {obj}", "increase the saturation of {obj}",
        "make the colors of {obj} richer", "intensify the colors of {obj}", "make {obj} more colorful",
        "make the colors of {obj} more intense", "raise the color saturation of {obj}"]),
    "desaturate": _compose([
        "make {obj} less saturated", "desaturate {obj}", "reduce the saturation of {obj}", "lower the saturation of {obj}",
        "make the colors of {obj} paler", "drain some color from {obj}", "make {obj} less colorful",
        "tone down the colors of {obj}", "make the colors of {obj} weaker"]),
    "tint": _compose([
        "tint {obj} {colour}", "give {obj} a {colour} tint", "add a {colour} tint to {obj}", "wash {obj} in {colour}",
        "colorize {obj} {colour}", "overlay {colour} on {obj}", "cast a {colour} hue over {obj}",
        "give {obj} a {colour} wash", "tint {obj} with {colour}"]),
}

HELD_OUT: dict[str, tuple[str, ...]] = {
    "blur": ("defocus the scene", "make everything fuzzy", "smudge the whole scene",
             "make the whole frame hazy", "let the lens miss its focus", "give the shot a dreamy unfocused quality"),
    "sharpen": ("accentuate the contours", "give the shot more definition", "emphasise the minute structures",
                "make the fine lines more distinct", "add clarity to the scene", "make the contours more pronounced"),
    "add_noise": ("add static to the shot", "pepper the frame with dots", "dither the scene with random flecks",
                  "give the picture a sandy rough look", "make it look like a cheap sensor captured it",
                  "scatter flecks across the shot"),
    "denoise": ("tidy up the speckles", "make the surfaces look smooth and even", "scrub away the mottling",
                "purify the scene of its speckles", "calm the busy mottled surfaces", "give the frame a spotless finish"),
    "age": ("make this shot look like it came from a great grandparent's album", "weather the scene like a forgotten keepsake",
            "make it look like a relic from grandma's attic", "give the scene a nostalgic sepia patina",
            "turn the frame into a daguerreotype", "make the picture look like a memento from long ago"),
    "restore": ("mend the cracks and blemishes", "return the scene to mint condition", "heal the creases and blotches",
                "recover the pristine original", "rejuvenate this tattered snapshot", "make the shot look freshly developed"),
    "brighten": ("illuminate the scene", "make the scene more luminous", "give the shot a sunnier airier feel",
                 "lift the midtones", "make the picture radiant", "fill the frame with daylight"),
    "darken": ("make the scene gloomier", "give the shot a murky look", "deepen the shadows",
               "sink the frame into shade", "make the whole scene more somber", "make it look like dusk has fallen"),
    "contrast_up": ("make the scene more dramatic", "give the shot more depth and drama", "make it bolder",
                    "increase the separation between tones", "push the tones further apart",
                    "give the frame a striking intensity"),
    "contrast_down": ("compress the tonal range", "make the picture look misty and muted", "give the shot a matte look",
                      "make everything look dull and gentle", "tame the harshness", "give the frame a low key subdued character"),
    "warmer": ("make the scene feel like golden hour", "give the shot a cozy candlelit glow", "make it feel like a summer sunset",
               "bathe the frame in late afternoon sun", "give everything a toasty fireside vibe", "make the scene feel sunbaked"),
    "cooler": ("make the scene feel like a winter morning", "make the shot icy and frosty",
               "make it feel like an overcast arctic day",
               "give everything a wintry snowy atmosphere", "make the scene look like it was shot in a frozen fjord",
               "give the frame a glacial chill"),
    "saturate": ("make everything look lush and vibrant", "give the scene a technicolor splendour", "make the palette juicier",
                 "let every pigment blaze at full strength", "give the frame eye popping pigments",
                 "turn the scene into a carnival of pigment"),
    "desaturate": ("make the scene look pastel", "give the shot a bleached look", "make the scene look almost monochrome",
                   "drain the frame until it is nearly grey", "make everything look drab and greyish",
                   "make the scene look chalky and anaemic"),
    "tint": ("drench the scene in {colour}", "steep the frame in {colour}", "soak the picture in {colour}",
             "dye the scene {colour}", "lay a {colour} veil over the whole shot", "douse the scene in {colour}"),
}

# ---------------------------------------------------------------- keywords


_SUFFIXES = ("iness", "ness", "ing", "ier", "iest", "ers", "er", "est", "ed", "en", "ly", "y", "es", "s")


def stem(word: str) -> str:
    """A crude stem, enough to match "blurry"/"blur", "brighter"/"bright", "darkened"/"dark"."""
    w = word.lower()
    for suffix in _SUFFIXES:
        if w.endswith(suffix) and len(w) - len(suffix) >= 3:
            return w[: -len(suffix)]
    return w


def content_words(text: str) -> set[str]:
    """The stems of a text's words that are not ``GENERIC`` (numbers, units and slots dropped)."""
    words = re.findall(r"[a-z']+", re.sub(r"\{[a-z]+\}", " ", text.lower()))
    return {stem(w) for w in words if w not in GENERIC and w.rstrip("'s") not in GENERIC and len(w) > 1}


def _related(a: str, b: str) -> bool:
    """Two stems name the same word: equal, or one is the other with up to 3 more letters and the
    shorter has 4 or more ("blur"/"blurr", "light"/"lighten"; not "back"/"background")."""
    short, long = sorted((a, b), key=len)
    return a == b or (len(short) >= 4 and long.startswith(short) and len(long) - len(short) <= 3)


def keywords(edit: str, extra: dict[str, set[str]] | None = None) -> set[str]:
    """An edit's keywords: the content-word stems of all its phrasings (training and held-out), plus
    ``extra[edit]`` (for example the colour names that fill tint's slot)."""
    words = set().union(*(content_words(p) for p in TRAIN[edit] + HELD_OUT[edit]))
    return words | set((extra or {}).get(edit, ()))


def clashes(text: str, words: set[str]) -> list[str]:
    """The content words of ``text`` that name one of ``words`` (see ``_related``)."""
    return sorted(w for w in content_words(text) if any(_related(w, k) for k in words))


def check_language(extra: dict[str, set[str]] | None = None, min_train: int = 30, min_held_out: int = 6) -> None:
    """Raise ``ValueError`` listing every problem: too few phrasings, a phrasing used twice, or a
    held-out phrasing that uses another edit's keyword."""
    problems, seen = [], {}
    for edit in TRAIN:
        if len(TRAIN[edit]) < min_train:
            problems.append(f"{edit}: {len(TRAIN[edit])} training phrasings, need {min_train}")
        if len(HELD_OUT[edit]) < min_held_out:
            problems.append(f"{edit}: {len(HELD_OUT[edit])} held-out phrasings, need {min_held_out}")
        for p in TRAIN[edit] + HELD_OUT[edit]:
            if p in seen:
                problems.append(f"{p!r} is a phrasing of both {seen[p]} and {edit}")
            seen[p] = edit
        others = set().union(*(keywords(e, extra) for e in TRAIN if e != edit))
        for p in HELD_OUT[edit]:
            if bad := clashes(p, others):
                owners = sorted(e for e in TRAIN if e != edit and clashes(p, keywords(e, extra)))
                problems.append(f"{edit} held-out {p!r} uses {bad}, keywords of {owners}")
    if problems:
        raise ValueError("the phrasings break the language rules:\n  " + "\n  ".join(problems))


def all_keywords(extra: dict[str, set[str]] | None = None) -> set[str]:
    """Every edit's keywords together."""
    return set().union(*(keywords(e, extra) for e in TRAIN))
