"""Pure: the content-safety gate's built-in vocabulary (docs/ARCHITECTURE.md, "Content-safety gate").

These lists live in code, not in the operator-editable ``safety_terms.yaml``: an operator's data file
can add to them (:mod:`bridge.prompt_data`), never remove or remap them. Terms are written plainly;
the gate normalises them exactly as it normalises a prompt, so accents, case and script do not
matter. A term ending in ``*`` is a word stem ("masturbat*": any word that starts so). Terms in
scripts without spaces (Japanese, Chinese) are matched anywhere in the text.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- minors
MINOR_TERMS: tuple[str, ...] = (
    # English
    "child", "children", "childs", "kid", "kids", "kiddie", "kiddo", "minor", "minors", "underage", "under age",
    "underaged", "under-aged", "preteen", "pre teen", "tween", "teen", "teens", "teenage", "teenager", "young teen",
    "toddler", "infant", "newborn", "schoolgirl", "schoolboy", "school girl", "school boy", "schoolchild",
    "schoolchildren", "schoolkid", "school kid", "little girl", "little boy", "young girl", "young boy",
    "loli", "lolis", "lolicon", "lolita", "shota", "shotacon", "jailbait", "nymphet", "barely legal",
    "prepubescent", "pre pubescent", "pubescent", "prepubertal", "adolescent", "juvenile", "youngster",
    "childlike", "child like", "pedo", "pedophile", "paedophile", "pedophilia", "paedophilia",
    "middle school", "middle schooler", "elementary school", "elementary schooler", "grade school",
    "grade schooler", "primary school", "junior high", "high schooler", "high school student",
    "high school girl", "high school boy", "high school freshman", "high school sophomore",
    "kindergarten", "kindergartener", "kindergartner", "preschooler", "girl scout", "boy scout",
    # Spanish
    "niño", "niña", "niños", "niñas", "nena", "nenas", "menor de edad", "menores de edad", "menores",
    "adolescente", "adolescentes", "colegiala", "colegialas", "chiquilla", "chiquillo", "infantil",
    # French
    "enfant", "enfants", "fillette", "fillettes", "petite fille", "petit garçon", "gamin", "gamine", "gamines",
    "écolière", "écolier", "collégienne", "collégien", "lycéenne", "mineure", "mineures", "ado", "ados",
    # German
    "kinder", "kindern", "ein kind", "das kind", "kleines kind", "kleine kinder", "kleines mädchen",
    "mädchen", "schulmädchen", "schülerin", "schüler", "minderjährig*", "jugendliche", "jugendlicher",
    # Italian
    "bambino", "bambina", "bambini", "bambine", "bimba", "bimbe", "ragazzina", "ragazzine", "ragazzino",
    "minorenne", "minorenni", "scolaretta", "scolarette",
    # Portuguese
    "criança", "crianças", "menina", "meninas", "menino", "meninos", "garotinha", "garotinho",
    "menor de idade", "novinha", "novinhas", "colegial",
    # Russian (stems: Russian inflects)
    "ребен*", "ребён*", "дети", "детей", "детск*", "девочк*", "мальчик*", "школьниц*", "школьник*",
    "несовершеннолетн*", "подрост*", "малолет*", "малышк*",
    # Japanese
    "子供", "子ども", "こども", "児童", "少女", "幼女", "幼児", "女子小学生", "女子中学生", "女子高生", "小学生",
    "中学生", "ロリ", "ショタ", "未成年",
    # Chinese
    "儿童", "兒童", "孩子", "小孩", "萝莉", "蘿莉", "女童", "男童", "初中生", "小女孩", "小男孩",
)

# ----------------------------------------------------------------------------- sexual content
SEXUAL_TERMS: tuple[str, ...] = (
    # English
    "sex", "sexual", "sexually", "sexy", "sexualized", "sexualised", "nude", "nudes", "nudity", "naked",
    "nakedness", "nsfw", "porn", "porno", "porns", "pornographic", "pornography", "erotic*", "lewd", "xxx",
    "hentai", "ecchi", "topless", "bottomless", "undressed", "undressing", "undress", "unclothed",
    "disrobed", "disrobing", "without clothes", "without clothing", "no clothes", "wearing nothing",
    "striptease", "stripper", "stripping", "lingerie", "seductive", "seductively", "seduce", "seducing",
    "sultry", "orgasm*", "intercourse", "fetish*", "aroused", "arousal", "arousing", "horny", "genital*",
    "penis", "vagina*", "vulva", "clitoris", "pussy", "cock", "nipple", "nipples", "breasts", "boobs", "tits",
    "bare buttocks", "onlyfans", "sensual", "make love", "making love", "masturbat*", "blowjob*", "handjob*",
    "fellatio", "cunnilingus", "cum", "cumshot", "creampie", "orgy", "orgies", "threesome", "rape", "raped",
    "raping", "molest*", "fondl*", "grope", "groped", "groping", "spread legs", "legs spread",
    "spreading her legs", "panties", "thong", "bdsm", "bondage", "hardcore", "slut", "sluts", "slutty",
    "whore", "fuck*", "playboy", "centerfold", "upskirt", "cameltoe", "skinny dipping", "provocative pose",
    "suggestive pose", "boudoir", "sexting", "in the nude", "bare chested girl", "touching herself",
    "touching himself", "kinky", "explicit sex", "explicit content", "explicit scene", "explicit photos",
    # Spanish
    "desnuda", "desnudo", "desnudas", "desnudos", "desnudez", "sexo", "erótica", "erótico", "tetas",
    "sin ropa", "follar", "cachonda", "pornografía",
    # French
    "nu", "nus", "nue", "nues", "toute nue", "tout nu", "sexe", "sexuel", "sexuelle", "érotique", "seins nus",
    "déshabillée", "déshabillé", "baiser", "pornographique",
    # German
    "nackt", "nackte", "nackten", "nacktes", "nackter", "sexuell*", "erotisch*", "entblößt", "ausgezogen",
    "ficken", "pornografisch",
    # Italian
    "nuda", "nudo", "nudi", "spogliata", "spogliato", "svestita", "sesso", "sessuale", "sessuali",
    "scopare", "pornografico",
    # Portuguese
    "nua", "nuas", "pelada", "peladas", "pelado", "sem roupa", "safada", "pornô", "transar", "tesão",
    # Russian
    "голая", "голый", "голые", "голой", "голенькая", "обнажен*", "обнажён*", "секс*", "порн*", "эротич*",
    "раздет*", "интим*",
    # Japanese
    "裸", "ヌード", "エロ", "セックス", "性的", "ポルノ", "全裸", "脱衣", "性交", "エッチ", "猥褻", "わいせつ",
    # Chinese
    "裸体", "裸體", "色情", "性爱", "性愛", "做爱", "做愛", "性感", "脱光", "淫",
)

# Words that may glue minor and sexual terms into one compound token ("sexyteengirl"): the
# compound splitter accepts a token only when it is made of these and the terms above.
COMPOUND_GLUE: tuple[str, ...] = (
    "girl", "girls", "boy", "boys", "little", "young", "small", "tiny", "cute", "hot", "baby", "pic", "pics",
    "photo", "photos", "video", "vid", "vids", "pose", "body", "real", "my", "her", "his", "the", "a", "and",
    "with", "of", "in", "pretty", "petite", "model", "models", "school", "student", "daughter", "sister",
)

# ----------------------------------------------------------------------------- ages
#: Words before a number that make it a person's age ("age: 14", "she's 14", "I am 14").
AGE_LEAD_PATTERNS: tuple[str, ...] = (
    r"\bages?\s*(?:of|is|was|[:=])?\s*",
    r"\baged\s*(?:of\s*)?",
    r"\b(?:she|he|they|i|you|we)\s*(?:is|'s|are|'re|am|'m|was|were|just turned|turned|turns|looks|look)\s*(?:only|just|barely|about|around|like)?\s*",
    r"\b(?:she|he|they)s\s*",
    r"\b(?:just turned|turning|turned)\s*",
    r"\blooks?\s*(?:like\s*)?(?:she|he)?\s*(?:is|'s)?\s*",
    r"\bedad\s*(?:de)?\s*[:=]?\s*",
    r"\b(?:âge|age)\s*(?:de)?\s*[:=]?\s*",
    r"\balter\s*[:=]?\s*",
    r"\bet[àa]\s*[:=]?\s*",
    r"\bidade\s*[:=]?\s*",
    r"\bвозраст\s*[:=]?\s*",
    r"\b(?:grade|class|year|primary)\s*",
    r"\b(?:girl|boy|child|kid|daughter|son|niece|nephew|sister|brother|student|pupil|model)s?\s*"
    r"(?:is|was|'s|who\s*is|of|aged|age)\s*(?:only|just|barely|about)?\s*",
)
#: Words after a number that make it a person's age ("14 years old", "14yo", "14 años", "14歳").
AGE_TAIL_PATTERN = (
    r"\s*(?:-\s*)?(?:"
    r"(?:years?|yrs?|yr|y)\s*[-\s]*(?:old|of\s*age)|yo|y/o|y\.o\.?|yos|yrs?old|yearold|"
    r"yrs?(?=\s*(?:[,.;)!]|$|and|girl|boy|kid|child|teen))|"
    r"(?:st|nd|rd|th)?\s*[-\s]*grade(?:r|rs)?|"
    r"(?:años|anos|ans|anni|jahre\s*alt|лет|год|года)(?!\s*(?:de|d'|di|da|do|of|назад|ago)\b)|歳|才|岁|歲"
    r")(?![a-z])"
)
#: Things that have ages and are not people: an age next to one of these is no minor signal.
AGE_OBJECTS: tuple[str, ...] = (
    "whisky", "whiskey", "whiskies", "scotch", "bourbon", "rum", "wine", "wines", "brandy", "cognac", "port",
    "cheese", "cheddar", "parmesan", "gouda", "beef", "steak", "ham", "balsamic", "vinegar", "tree", "trees",
    "oak", "barrel", "barrels", "cask", "casks", "house", "building", "car", "cars", "truck", "bike", "guitar",
    "violin", "company", "business", "brand", "dog", "dogs", "puppy", "cat", "cats", "horse", "horses",
    "vintage", "bottle", "single malt", "malt", "tequila", "anejo", "leather", "jeans", "denim", "bonsai",
    "account", "marriage", "relationship", "career", "game", "console", "laptop", "phone",
)
#: Number words read as ages (English, Spanish, French, German, Italian, Portuguese).
NUMBER_WORDS: dict[str, int] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90,
    "doce": 12, "trece": 13, "catorce": 14, "quince": 15, "dieciseis": 16, "diecisiete": 17,
    "douze": 12, "treize": 13, "quatorze": 14, "seize": 16, "dix-sept": 17,
    "zwolf": 12, "dreizehn": 13, "vierzehn": 14, "funfzehn": 15, "sechzehn": 16, "siebzehn": 17,
    "dodici": 12, "tredici": 13, "quattordici": 14, "quindici": 15, "sedici": 16, "diciassette": 17,
    "treze": 13, "catorze": 14, "quinze": 15, "dezesseis": 16, "dezessete": 17,
}

# Patterns that always mean a minor (no number to read).
MINOR_PATTERNS: tuple[str, ...] = (
    r"\bunder\s*(?:the\s*age\s*of\s*)?(?:18|eighteen)\b",
    r"\b(?:1st|2nd|3rd|[4-9]th|1[0-2]th|first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth)[\s-]*grader?s?\b",
    r"\b(?:grade|year)\s*(?:[1-9]|1[0-2])\s*(?:student|pupil|girl|boy|kid)s?\b",
    r"\b(?:not|isn.?t|is\s*not|aren.?t)\s*(?:an?\s*)?(?:adult|grown\s*up|of\s*age|legal)s?\b",
    r"\b(?:freshman|sophomore)\s*(?:in|at)\s*high\s*school\b",
    r"\b(?:too|very)\s*young\s*(?:for|to)\b",
    r"\b(?:1[0-7]|[1-9])\s*(?:and|&|or)\s*(?:a\s*)?half\s*(?:years?|yo)\b",
)

# ----------------------------------------------------------------------------- context
#: Phrases blanked out before matching: ordinary uses of a minor or sexual word in another sense.
ALLOWED_PHRASES: tuple[str, ...] = (
    r"\bminor[\s-]*(?:league|leagues|leaguer|leaguers|chord|chords|key|keys|scale|scales|detail|details|injury|injuries|"
    r"scar|scars|scratch|scratches|flaw|flaws|change|changes|adjustment|adjustments|issue|issues|role|roles|"
    r"character|characters|planet|planets|arcana|third|seventh|mode|edit|edits|tweak|tweaks|update|bug|bugs|"
    r"problem|problems|repair|repairs|surgery|damage|error|errors|inconvenience|fix|fixes|difference|differences|"
    r"burn|burns|cut|cuts|bruise|bruises|wound|wounds|accident|accidents|offense|offence|offenses|offences|"
    r"infraction|infractions|procedure|procedures|ailment|ailments|setback|setbacks|deity|deities|god|gods|"
    r"party|parties|axis|premise|version|revision|point|points|piece|pieces|part|parts)\b",
    r"\b(?:in\s*a\s*)?minor\s*(?:key)?\b(?=\s*(?:sonata|symphony|concerto|prelude|fugue|nocturne|etude|scale|chord))",
    # Musical keys, only where the music is said ("a minor" alone is a minor):
    r"\bkey\s*of\s*[a-g](?:\s*(?:sharp|flat|#|b))?\s*minor\b", r"\b[a-g]\s*(?:sharp|flat|#)\s*minor\b",
    r"\b[a-g]\s*minor\s*(?=(?:sonata|symphony|concerto|prelude|fugue|nocturne|etude|scale|chord|key|melody|"
    r"ballad|piece|song|mass|quartet|trio|requiem|waltz|progression|triad|arpeggio)s?\b)",
    r"\b(?:with|to|by|through)\s*the\s*naked\s*eye\b", r"\bnaked[\s-]*eye\s*(?:observation|astronomy|view|visible)\b",
    r"\bnaked\s*(?:truth|ambition|flame|bulb|lightbulb|wire|wires|blade|sword|steel|greed|aggression|"
    r"mole\s*rat|mole\s*rats|singularity|short|shorting|call|calls|put|puts)\b",
    r"\bchild[\s-]*(?:free|less|proof)\b", r"\bchildfree\b", r"\bkid[\s-]*free\b",
    r"\b(?:no|without)\s*(?:kids|children)\s*(?:allowed|policy|zone|around|present)?\b",
    r"\b(?:not\s*(?:suitable|appropriate|intended)\s*for|keep\s*away\s*from|out\s*of\s*reach\s*of|"
    r"protect(?:ing)?|away\s*from)\s*(?:children|kids|minors)\b",
    r"\bkid\s*gloves\b", r"\bkidding\b", r"\bnu[\s-]*(?:metal|disco|jazz|soul|wave|age)\b",
    # A parent described by their children ("mom of 3 kids", "has two kids"); never "with": a
    # child beside the adult is in the scene.
    r"\b(?:mom|mother|mum|mommy|momma|mama|milf|dad|father|daddy|dilf|parent|stepmom|stepdad|single\s*mom|"
    r"single\s*dad)s?\s*of\s*(?:a|an|one|two|three|four|five|six|\d{1,2}|several|many)?\s*(?:grown\s*|adult\s*)?"
    r"(?:kids|kid|children|child|sons|son|daughters|daughter|boys|girls|teens|teenagers)\b",
    r"\b(?:has|have|had|raising|raised)\s*(?:\d{1,2}|one|two|three|four|five|six)\s*(?:grown\s*)?"
    r"(?:kids|children|sons|daughters)\b",
    r"\b(?:grown|adult|grown[\s-]*up)\s*(?:kids|children|daughter|daughters|son|sons)\b",
    r"\b(?:the|our|my|her|his|their)\s*kids\s*(?:are\s*)?(?:grown|moved\s*out|at\s*(?:school|college|grandma.?s)|"
    r"asleep|away)\b",
    r"\b(?:sex|gender)\s*(?:of\s*(?:the|a|your|her|their)\s*)?(?:unborn\s*)?(?:baby|child)?\s*reveal\b",
    r"\bsex\s*of\s*(?:the|a|your|her|their)\s*unborn\s*(?:baby|child)\b",
    r"\bbaby\s*doll\b", r"\bbabydoll\b",
    r"\bsex\s*(?:education|ed|determination|chromosome|chromosomes|ratio|of\s*the\s*(?:fish|bird|animal|plant|puppy|kitten))\b",
    r"\bcock\s*(?:pit|tail|tails|roach|roaches|atoo|erel|ney|y)\b", r"\bcocktail\b", r"\bcockpit\b",
    r"\bpussy\s*(?:cat|cats|willow)\b", r"\bnudos\b",
    r"\b(?:teen|teens|teenage|twenty)[\s-]*(?:something|somethings)\b",
    r"裸眼", r"裸足", r"赤裸裸",
)

#: Words that pull a youth steering into an image when a sexual prompt puts them in its negative
#: prompt ("nude woman", negative "adult, mature"): an age-steering negative is a minor signal.
ADULT_MARKERS: tuple[str, ...] = (
    "adult", "adults", "adult body", "mature", "grown up", "grownup", "grown woman", "grown man", "18+",
    "18 plus", "over 18", "of age", "large breasts", "big breasts", "pubic hair", "adulte", "adultes",
    "erwachsen*", "adulto", "adulta", "adulti", "взросл*", "大人", "成人", "成熟",
)
