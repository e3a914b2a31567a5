"""The review world's vocabulary and grammar: word classes with VADER valences, rules, sentiment grid.

Data only (tasks/reviews.py compiles it into a weighted automaton): a word or rule valence v on
VADER's -4..4 scale becomes the polarity clip(v / 3, -1, 1) that biases its choice by sentiment.
"""

from __future__ import annotations

import numpy as np

GRID = np.linspace(-1.0, 1.0, 9)  # latent sentiment values, uniform prior
BETA = 2.5  # strength of the sentiment bias on choices


def _table(spec):
    """'word:valence word ...' (valence 0 when omitted) -> [(word, valence)]."""
    out = []
    for item in spec.split():
        word, _, value = item.partition(":")
        out.append((word, float(value or 0.0)))
    return out


# Valences follow VADER's lexicon where it has the word, so the latent sentiment and the
# VADER-based gold scorer agree; the rest (sturdy, flimsy, ...) are ours and VADER-blind.
_GENERAL_ADJ = (
    "great:3.1 wonderful:2.7 amazing:2.8 excellent:2.7 fantastic:2.6 brilliant:2.8 superb:3.1 "
    "good:1.9 nice:1.8 lovely:2.8 beautiful:2.9 perfect:2.7 outstanding:3 impressive:2.3 solid:0.6 "
    "terrific:2.1 awesome:3.1 pleasant:2.3 fine:0.8 fabulous:2.4 marvelous:2.9 remarkable:2.6 "
    "splendid:2.8 decent:1 awful:-2 terrible:-2.1 horrible:-2.5 bad:-2.5 poor:-2.1 weak:-1.9 "
    "disappointing:-2.2 lousy:-2.5 dreadful:-1.9 pathetic:-2.7 useless:-1.8 worthless:-1.9 "
    "miserable:-2.2 disastrous:-2.9 annoying:-1.7 frustrating:-1.9 ugly:-2.3 mediocre:-1.2 "
    "okay:0.9 average ordinary simple typical standard basic plain different unusual"
)
_FILM_ADJ = (
    "hilarious:1.7 funny:1.9 moving:1.5 touching:1.5 gripping:1.8 entertaining:1.9 engaging:1.4 "
    "inspiring:1.8 memorable:1.8 exciting:2.2 thrilling:2.1 charming:2.8 delightful:2.8 clever:2 "
    "stunning:1.6 enjoyable:1.9 boring:-1.3 dull:-1.7 tedious:-1.8 bland:-1.2 predictable:-1 "
    "forgettable:-1.5 stupid:-2.4 lame:-1.8 painful:-1.9 messy:-1.5 ridiculous:-1.5 confusing:-0.9 "
    "pointless:-1.8 dreary:-1.4 depressing:-1.6 long short slow:-0.3 dark quiet loud strange:-0.8"
)
_PRODUCT_ADJ = (
    "sturdy:1.5 durable:1.5 reliable:1.6 comfortable:2.3 handy:1.2 sleek:1.2 smooth:1 elegant:2.1 "
    "powerful:1.8 stylish:1.4 compact:0.5 flimsy:-1.6 fragile:-1 cheap:-1 broken:-2.1 noisy:-0.7 "
    "uncomfortable:-1.6 unreliable:-1.6 shoddy:-1.8 faulty:-1.3 clumsy:-1.2 awkward:-0.6 bulky:-0.5 "
    "expensive:-0.5 heavy light small large new"
)
_NUMBERS = "one two three four five six seven eight nine ten".split()
CLASSES = {
    "F_ADJ": _table(_GENERAL_ADJ + " " + _FILM_ADJ),
    "P_ADJ": _table(_GENERAL_ADJ + " " + _PRODUCT_ADJ),
    "INTENS": _table(
        "really very extremely incredibly absolutely quite so totally completely thoroughly "
        "utterly somewhat slightly fairly rather"
    ),
    "ADVV": _table("really absolutely totally just actually simply"),
    "VERB_PAST": _table(
        "loved:2.9 liked:1.8 enjoyed:2.3 adored:1.8 admired:2.3 appreciated:2.3 hated:-3.2 "
        "disliked:-1.7 despised:-1.7 loathed:-2.1 noticed remembered expected"
    ),
    "VERB_PRES": _table(
        "love:3.2 like:1.5 enjoy:2.2 adore:2.6 appreciate:1.7 hate:-2.7 dislike:-1.6 regret:-1.8 use need"
    ),
    "MANNER": _table(
        "well:1.1 perfectly:3.2 fine:0.8 great:3.1 flawlessly:0.8 smoothly:1.2 badly:-2.1 "
        "poorly:-2 terribly:-2.6 horribly:-2.4 okay:0.9"
    ),
    "SADV": _table(
        "sadly:-1.8 unfortunately:-1.4 thankfully:1.8 luckily:2.3 happily:2.6 surprisingly:1.2 "
        "frankly personally admittedly"
    ),
    "NUMBER": [(w, 3.0 * (i - 4.5) / 4.5) for i, w in enumerate(_NUMBERS)],
    "CONJ": _table("and but although while"),
    "NAME": _table(
        "smith garcia chen nolan jones patel kim rossi novak silva muller kowalski tanaka okafor "
        "dubois larsen murphy walsh moreau costa ivanova schmidt nakamura oliveira haddad"
    ),
    "BRAND": _table("acme zenith nova orion vertex lumen apex solis quanta helix kairo tessla"),
    "FNOUN": _table("film movie picture drama documentary sequel musical western cartoon remake"),
    "FASPECT": _table(
        "acting plot story script dialogue ending soundtrack music cinematography direction "
        "pacing cast editing finale opening twist premise screenplay lighting atmosphere setting "
        "tone camera animation climax lead"
    ),
    "FASPECTS": _table("effects characters actors visuals costumes songs scenes sets performances locations stunts"),
    "ROLE": _table("detective mother father king soldier doctor teacher captain stranger widow lawyer pilot"),
    "FRIEND": _table("wife husband kids family parents brother sister son daughter girlfriend boyfriend"),
    "PNOUN": _table(
        "phone laptop blender vacuum camera headset charger kettle chair backpack speaker toaster "
        "lamp watch keyboard mattress monitor router tablet printer drill heater mixer jacket umbrella"
    ),
    "PASPECT": _table(
        "battery screen design price quality sound build handle lid fabric packaging delivery "
        "setup manual material finish motor strap cable display interface zipper warranty app "
        "size weight color"
    ),
    "PASPECTS": _table("buttons instructions speakers wheels batteries pockets blades controls accessories settings"),
}

# NONTERMINAL: [(weight, right-hand side, rule valence)]. Upper-case tokens are nonterminals or
# classes; anything else is a literal word. '' derives the empty string.
RULES = {
    "REVIEW": [(0.55, "FILM"), (0.45, "PRODUCT")],
    "FILM": [(1, "F_OPEN F_SENT F_MORE F_CLOSE")],
    "F_MORE": [(0.6, ""), (0.4, "F_SENT F_MORE")],
    "F_OPEN": [
        (3, "this FNOUN COP F_PRED ."),
        (2, "i watched the FNOUN WHEN and F_FOLLOW ."),
        (1, "i went to see this FNOUN WHEN and F_FOLLOW ."),
        (1.5, "the new FNOUN by NAME COP F_PRED ."),
        (1, "SADV , this FNOUN COP F_PRED ."),
    ],
    "WHEN": [(3, ""), (1, "last night"), (1, "yesterday"), (1, "this weekend"), (1, "with my FRIEND"), (1, "at home")],
    "F_FOLLOW": [(2, "it was F_PRED"), (1, "i VERB_PAST it"), (0.5, "i ADVV VERB_PAST it"), (0.5, "we VERB_PAST it")],
    "COP": [(8, "was"), (1, "felt"), (1, "seemed")],
    "COPS": [(8, "were"), (1, "felt"), (1, "seemed")],
    "F_PRED": [(11, "F_ADJ"), (6, "INTENS F_ADJ"), (2, "not ~F_ADJ"), (1, "not INTENS ~F_ADJ")],
    "F_SENT": [
        (6, "F_CLAUSE ."),
        (2.5, "F_CLAUSE , CONJ F_CLAUSE ."),
        (1.5, "SADV , F_CLAUSE ."),
        (2, "i VERB_PAST the FASPECT ."),
        (1, "i ADVV VERB_PAST the FASPECT ."),
        (1, "NAME was F_PRED as the ROLE ."),
        (1, "it was F_PRED from start to finish ."),
    ],
    "F_CLAUSE": [
        (4, "the FASPECT COP F_PRED"),
        (2, "the FASPECTS COPS F_PRED"),
        (1, "the performance by NAME COP F_PRED"),
    ],
    "F_CLOSE": [
        (2, "i would recommend it RECIP .", 2),
        (2, "i would not recommend it .", -2),
        (2, "NUMBER out of ten ."),
        (1.5, "overall , it was F_PRED ."),
        (1, "avoid this FNOUN .", -2.5),
        (1, "do not waste your time .", -2.5),
        (1, "i VERB_PAST every minute of it ."),
        (1, "go and see it .", 2),
        (1, "definitely worth watching .", 2),
    ],
    "RECIP": [(3, ""), (1, "to anyone"), (1, "to everyone"), (1, "to my family")],
    "PRODUCT": [(1, "P_OPEN P_SENT P_MORE P_CLOSE")],
    "P_MORE": [(0.6, ""), (0.4, "P_SENT P_MORE")],
    "P_OPEN": [
        (3, "this PNOUN is P_PRED ."),
        (2, "i bought this PNOUN WHENP and P_FOLLOW ."),
        (1.5, "i have used this PNOUN for DURATION and P_FOLLOW ."),
        (1, "SADV , this PNOUN is P_PRED ."),
        (1.5, "the new PNOUN from BRAND is P_PRED ."),
    ],
    "WHENP": [(3, ""), (1, "last month"), (1, "a week ago"), (1, "for my FRIEND"), (1, "online")],
    "P_FOLLOW": [(2, "it is P_PRED"), (1, "it works MANNER"), (1, "i VERB_PRES it"), (0.5, "i ADVV VERB_PRES it")],
    "COPP": [(8, "is"), (1, "feels"), (1, "seems")],
    "P_PRED": [(11, "P_ADJ"), (6, "INTENS P_ADJ"), (2, "not ~P_ADJ"), (1, "not INTENS ~P_ADJ")],
    "P_SENT": [
        (6, "P_CLAUSE ."),
        (2.5, "P_CLAUSE , CONJ P_CLAUSE ."),
        (1.5, "SADV , P_CLAUSE ."),
        (2, "i VERB_PRES the PASPECT ."),
        (1, "it broke after DURATION .", -2),
        (1, "it still works after DURATION .", 1.5),
    ],
    "P_CLAUSE": [(4, "the PASPECT COPP P_PRED"), (2, "the PASPECTS are P_PRED"), (1, "it works MANNER")],
    "P_CLOSE": [
        (2, "i would buy it again .", 2),
        (2, "i would not buy it again .", -2),
        (2, "NUMBER out of ten ."),
        (1, "worth every penny .", 2.5),
        (1, "what a waste of money .", -2.5),
        (1, "i returned it the next day .", -2),
        (1.5, "overall , it is P_PRED ."),
        (1, "i would recommend it RECIP .", 2),
        (1, "i would not recommend it .", -2),
    ],
    "DURATION": [(1, "a week"), (1, "a month"), (1, "two weeks"), (1, "six months"), (1, "a year"), (1, "three days")],
}
