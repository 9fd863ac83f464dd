"""Captioning metrics equal to the coco-caption reference (pycocoevalcap), in pure Python.

coco-caption scores captions in two steps: it runs Stanford CoreNLP 3.4.1's ``PTBTokenizer`` (Java, options
``-preserveLines -lowerCase``) over the references and over the candidates, drops the punctuation tokens in
:data:`PTB_PUNCTUATION`, and then computes BLEU-1..4 (corpus level, closest reference length), CIDEr-D (its ``Cider``
class *is* CIDEr-D: sigma 6, clipped tf-idf, x10, idf from the evaluated references) and ROUGE-L (beta 1.2).

This module does both steps without Java:

* :func:`ptb_tokenize` / :func:`ptb_tokenize_batch` re-implement the PTBTokenizer step as a longest-match lexer with
  the rules of CoreNLP 3.4.1's ``PTBLexer`` (contractions, "cannot"/"gonna" splits, abbreviations and acronyms,
  numbers, fractions, dates, phone numbers, e-mail/URL/file-name tokens, smileys, quotes to ``` `` ```/``''``,
  brackets to ``-lrb-``/``-lsb-``/``-lcb-``, dashes, ellipses, currency symbols, ...). It was checked token for token
  against the Java tokenizer on ~240,000 caption-like and random ASCII/Unicode strings with no difference. Known
  differences are limited to exotic input: characters whose Unicode category changed since Java 7's tables (Java
  deletes unknown characters as untokenizable, as we do with characters outside the Basic Multilingual Plane), and
  line separators other than ``\\n`` inside a caption (coco-caption splits lines there and misaligns every later
  caption; we treat them as spaces).
* :func:`bleu`, :func:`cider_d`, :func:`rouge_l` follow pycocoevalcap's arithmetic (including its smoothing
  constants, its whitespace splitting, and ROUGE-L's ``split(" ")``), so scores agree to floating-point rounding.

The evaluated set is the set of candidate ids: references of other ids are ignored, exactly as coco-caption only
loads the references of the images in the results file. CIDEr-D therefore depends on which images are scored.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from functools import lru_cache

__all__ = [
    "PTB_PUNCTUATION",
    "bleu",
    "caption_scores",
    "cider_d",
    "ptb_tokenize",
    "ptb_tokenize_batch",
    "rouge_l",
]

#: Tokens coco-caption removes after PTB tokenisation (its ``PUNCTUATIONS`` list). The lexer lowercases brackets to
#: ``-lrb-`` etc. *before* this filter runs, so in practice bracket tokens stay in the text, as in coco-caption.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# ---------------------------------------------------------------------------------------------------------------------
# PTB tokenizer (CoreNLP 3.4.1 PTBLexer semantics: longest match over all rules, ties go to the earlier rule;
# a rule "r1 / r2" matches r1 only if trailing context r2 follows, and competes with the length of r1 r2).
# ---------------------------------------------------------------------------------------------------------------------


def _ci(alternatives: str) -> str:
    """Case-insensitive group, like a JFlex ``%caseless`` literal (character classes stay case-sensitive)."""
    return f"(?i:{alternatives})"


def _cs_first(words: str) -> str:
    """Alternation where each word's first letter is case-sensitive and the rest caseless (JFlex ``[M]iss``)."""
    return "|".join(w[0] + (_ci(w[1:]) if len(w) > 1 else "") for w in words.split())


def _unicode_class(pred: Callable[[str], bool], extra: str = "") -> str:
    """A regex character class of the Basic-Multilingual-Plane characters for which ``pred`` holds."""
    parts = []
    start = None
    for cp in range(0x10001):
        ok = cp < 0x10000 and not 0xD800 <= cp <= 0xDFFF and pred(chr(cp))
        if ok and start is None:
            start = cp
        elif not ok and start is not None:
            a, b = re.escape(chr(start)), re.escape(chr(cp - 1))
            parts.append(a if start == cp - 1 else f"{a}-{b}")
            start = None
    return "[" + "".join(parts) + extra + "]"


# Characters PTBLexer also accepts inside words although Java does not call them letters (combining marks, ...).
_EXTRA_LETTERS = (
    "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385\u03cf\u03f6"
    "\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4"
    "\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f"
    "\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963"
    "\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
    "\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44"
    "\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
)
_MISC_SYMBOLS = (
    "+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7\u0387\u05be\u05c0\u05c3\u05c6"
    "\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965"
    "\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f\u208a-\u208e"
    "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65"
)

# Token actions. A rule's action maps the matched text (without trailing context) to the emitted token; a few rules
# give characters back to the input (JFlex ``yypushback``), encoded by the special kinds below.
_KEEP, _DROP, _NEWLINE, _SPLIT3, _SPLIT2, _ACRONYM, _REPEAT_PERIOD = range(7)

_LEFT_SINGLE = re.compile("[\u0091\u2018\u201b\u2039]")
_RIGHT_SINGLE = re.compile("[\u0092\u2019\u203a]")
_LEFT_DOUBLE = re.compile("[\u0093\u201c\u00ab]")
_RIGHT_DOUBLE = re.compile("[\u0094\u201d\u00bb]")
_STRAIGHT_SINGLE = re.compile("(?i:&apos;)|'")
_STRAIGHT_DOUBLE = re.compile('"|(?i:&quot;)')


def _quotes(tok: str, left: bool) -> str:
    """LaTeX-style quote normalisation: opening ` and ``, closing ' and ''."""
    tok = _STRAIGHT_SINGLE.sub("`" if left else "'", tok)
    tok = _STRAIGHT_DOUBLE.sub("``" if left else "''", tok)
    tok = _LEFT_SINGLE.sub("`", tok)
    tok = _RIGHT_SINGLE.sub("'", tok)
    tok = _LEFT_DOUBLE.sub("``", tok)
    return _RIGHT_DOUBLE.sub("''", tok)


def _no_soft_hyphen(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _amp(tok: str) -> str:
    return re.sub("(?i:&amp;)", "&", tok)


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _currency(tok: str) -> str:
    tok = tok.replace("\u00a2", "cents").replace("\u00a3", "#")
    return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", tok)


def _fraction(tok: str) -> str:
    for char, text in (("\u00bc", "1/4"), ("\u00bd", "1/2"), ("\u00be", "3/4"), ("\u2153", "1/3")):
        tok = tok.replace(char, text)
    return tok


def _const(text: str) -> Callable[[str], str]:
    return lambda _tok: text


_Action = Callable[[str], str] | int


class _Rule:
    __slots__ = ("regex", "has_trail", "action")

    def __init__(self, pattern: str, trail: str | None, action: _Action) -> None:
        self.has_trail = trail is not None
        self.regex = re.compile(f"({pattern})(?:{trail})" if trail is not None else pattern)
        self.action = action


@lru_cache(maxsize=1)
def _rules() -> tuple[tuple[_Rule, ...], re.Pattern[str]]:
    """Build the lexer rules (once; building the Unicode classes takes ~0.1 s)."""
    letter_cls = _unicode_class(lambda c: unicodedata.category(c)[0] == "L", _EXTRA_LETTERS)
    pure_letter = _unicode_class(lambda c: unicodedata.category(c)[0] == "L")
    digit = _unicode_class(lambda c: unicodedata.category(c) == "Nd")
    alnum = _unicode_class(lambda c: unicodedata.category(c)[0] == "L" or unicodedata.category(c) == "Nd")

    letter = f"(?:{letter_cls}|&[aeiouAEIOU]{_ci('acute|grave|uml')};)"
    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])"
    space_nl = f"(?:{space}|{newline})"
    sgml_name = "[A-Za-z][A-Za-z0-9_:.-]*"
    sgml_value = "(?:'[^'\\r\\n]*'|\"[^\"\\r\\n]*\")"
    sgml_attr = f"(?:{sgml_name}(?: *= *{sgml_value})?|{sgml_value})"
    sgml = f"<(?:[!?][A-Za-z-][^>\\r\\n]*|/?{sgml_name}(?: +{sgml_attr})* */?) *>"
    apos = "(?:['\u0092\u2019]|(?i:&apos;))"
    apos_etc = f"(?:{apos}|[`\u0091\u2018\u201b])"
    word = f"{letter}(?:{letter}|{digit})*(?:[.!?]{letter}(?:{letter}|{digit})*)*"
    redaux = f"{apos}(?:[msdMSD]|{_ci('re|ve|ll')})"
    sword = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
    sredaux = f"{_ci('n')}{apos_etc}{_ci('t')}"
    num = f"(?:{digit}*(?:[.:,\u00ad\u066b\u066c]{digit}+)+|{digit}+)"  # longer alternative first (longest match)
    hyphen = "[-_\u058a\u2010\u2011]"
    thing_part = f"(?:[dDoOlL]{apos_etc}{alnum})?{alnum}+"
    thing = f"{thing_part}(?:{hyphen}{thing_part})*"
    thinga = f"[A-Z]+(?:(?:[+&]|{_ci('&amp;')})[A-Z]+)+"
    thing3 = r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    acro_special = _ci(r"canada|sino|korean|eu|japan|non") + r"-(?i:u\.s)|(?i:u\.s\.-)(?i:u\.s\.s\.r|u\.k)"
    acro = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])*)"  # single letters count, e.g. "I." before "The"
    acro2 = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])+)"
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{acro2}\\.|[A-Za-z0-9\u00ad]+))+"
    insentp = "[,;:\u3001]"
    # Abbreviations. Group 1 keeps its period in any context; group 3 only before a number ("Fig. 3", "No. 5").
    abbrev1_words = (
        "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec|Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
        "|Ala|Ariz|Calif|Colo|Conn|Ct|Dak|Fla|Ga|Ind|Kans?|Ky|Md|Mich|Minn|Mo|Mont|Neb|Nev|Okla|Penn|Tenn|Va|Vt|Wisc?|Wyo"
        "|Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys|tel|est|ext|sq"
        "|Jr|Sr|Bros|(?:Ed|Ph)\\.D|Blvd|Rd|Esq|etc|al|seq|Bldg"
    )
    abbrev1 = f"(?:{_ci(abbrev1_words)}|{_cs_first('Az Ark Del Ill La Mass Miss Ore Pa Tex Wash')})\\."
    titles = _ci(
        "Mr|Mrs|Ms|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Capt|Ste?|Ave|Pres"
        "|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Mt|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc"
    )
    others = _ci("vs|Alex|Wm|Jos|Cie|cf|TREAS|Ph|Invt|Elec|Natl|Dept")
    aka = _ci(r"a\.k\.a")
    abbrev4 = f"(?:{acro}|{aka}|{titles}|M{_ci('iss')}|{others}|{_ci('m')}[ft]{_ci('g')}|[A-Za-z])"
    abbrev3 = _ci("ca|figs?|prop|nos?|art|pp|op") + "\\."
    acro_followers = _cs_first(
        "About According Additionally After An A As At But Earlier He Her Here However If In It Last Many More Mr. Ms."
        " Now Once One Other Our She Since So Some Such That The Their Then There These They This We When While What"
        " Yet You"
    ).replace(".", "\\.")
    phone = (
        r"(?:(?:\([0-9]{2,3}\)[ \u00a0]?|(?:\+\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}[- \u00a0]?"
        r"[0-9]{3,5}|(?:(?:\+\+?)?[0-9]{2,4}\.)?[0-9]{2,4}\.[0-9]{3,4}\.[0-9]{3,5})"
    )
    url_end = '[^ \t\n\f\r"<>|.!?(){},-]'
    full_url = _ci("https?") + f'://[^ \t\n\f\r"<>|()]+{url_end}'
    # NB: ",-_" below is a character *range* (0x2C-0x5F), as in the Java grammar.
    likely_url = (
        f'(?:(?:{_ci("www")}\\.(?:[^ \t\n\f\r"<>|.!?(){{}},]+\\.)+[a-zA-Z]{{2,4}})'
        f'|(?:(?:[^ \t\n\f\r"`\'<>|.!?(){{}},-_$]+\\.)+{_ci("com|net|org|edu")}))(?:/[^ \t\n\f\r"<>|()]+{url_end})?'
    )
    email_x = ' \t\n\f\r"<>|(){}\u00a0'
    email = f"(?:<|{_ci('&lt;')})?[a-zA-Z0-9][^{email_x}]*@(?:[^{email_x}.]+\\.)*[^{email_x}.]+(?:>|{_ci('&gt;')})?"
    file_ext = _ci(
        "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps"
        "|py|sql|tar|txt|wav|x|xml|zip"
    )
    filename_char = alnum[:-1] + "\u00ad]"
    filename = f"{filename_char}+(?:\\.{filename_char}+)*\\.{file_ext}"
    cds = _ci(r"C\.D\.s|pro-|anti-")
    tbspec = (
        f"-{_ci('RRB|LRB|RCB|LCB|RSB|LSB')}-|{cds}"
        f"|{_ci('S')}(?:&|{_ci('&amp;')})(?:{_ci('P-500')}|{_ci('Ls')})|{_ci('Cap')}{apos}{_ci('n')}|{_ci('c')}{apos}{_ci('est')}"
    )
    quotes = (
        f"(?:{_ci('&apos;')}|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a"
        "\u00ab\u00bb]{1,2}|['\u0092\u2019])"
    )
    dblquote = f'(?:"|{_ci("&quot;")})'
    smiley = r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]]"
    asian_smiley = r"(?:[\-^x=~<>']_[\-^x=~<>']|\([\-^x=~<>'][_.]?[\-^x=~<>']\)|\([\^x=~<>']-[\^x=~<>'`]\))"
    apoword = [
        f"{apos}{_ci('n')}{apos}?",
        f"[lLdDjJ]{apos}",
        f"{_ci('dunkin|somethin|ol')}{apos}",
        f"{apos}{_ci('em|cause|till?')}",
        f"[A-HJ-XZn]{apos_etc}{pure_letter}{{2}}{pure_letter}*",
        f"{apos}[2-9]0{_ci('s')}",
        f"{pure_letter}{pure_letter}*[aeiouyAEIOUY]{apos_etc}[aeiouA-Z]{pure_letter}*",
        _ci(r"cont'd\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
    ]

    specs: list[tuple[str, str | None, _Action]] = [
        (_ci(r"c\+\+|[cf]#"), None, _KEEP),
        (_ci("cannot|'twas"), None, _SPLIT3),  # can not, 't was
        (_ci("'tis|gonna|gotta|lemme|gimme|wanna"), None, _SPLIT2),  # gon na, gim me, 't is
        (sgml, None, _nbsp),
        (_ci("&(?:MD|mdash|ndash);") + "|[\u0096\u0097\u2013\u2014\u2015]", None, _const("--")),
        (_ci("&amp;"), None, _amp),
        (_ci("&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);"), None, _KEEP),
        (word, redaux, _no_soft_hyphen),  # "man" of "man's"
        (sword, sredaux, _no_soft_hyphen),  # "do" of "don't"
        (word, None, _no_soft_hyphen),
        *[(alt, None, _KEEP) for alt in apoword],
        (_ci("y") + apos, pure_letter, _KEEP),  # y' all
        (full_url, None, _KEEP),
        (likely_url, None, _KEEP),
        (email, None, _KEEP),
        (f"@[a-zA-Z_][a-zA-Z_0-9]*|#{letter}+", None, _KEEP),
        (redaux, "[^A-Za-z]", lambda t: _quotes(t, False)),
        (sredaux, None, lambda t: _quotes(t, False)),
        (f"{digit}{{1,2}}[-/]{digit}{{1,2}}[-/]{digit}{{2,4}}", None, _KEEP),  # dates
        (f"[-+]?{num}", None, _no_soft_hyphen),
        ("[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)", None, _KEEP),
        (f"(?:{digit}{{1,4}}[- \u00a0])?{digit}{{1,4}}(?:\\\\?/|\u2044){digit}{{1,4}}", None, _nbsp),  # 5 7/8
        ("[\u00bc\u00bd\u00be\u2153-\u215e]", None, _fraction),
        (tbspec, None, _amp),
        (thing3, None, _KEEP),
        (r"[A-Z]*\$|#", None, _KEEP),
        ("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]", None, _currency),
        (f"{acro}\\.", f"{space_nl}+(?:{acro_followers}|{sgml}){space_nl}", _ACRONYM),
        (abbrev3, f"{space_nl}?{digit}", _KEEP),
        (abbrev1, f"{space_nl}(?:{space_nl}|[A-Z]|{sgml})", _REPEAT_PERIOD),
        (abbrev1, "(?s:..)", _KEEP),
        (abbrev1, None, _KEEP),
        (f"{abbrev4}\\.", None, _KEEP),
        (abbrev4, space, _KEEP),
        (acro, space_nl, _KEEP),
        (f"{apos}[0-9][0-9]", space_nl, _KEEP),  # '90
        (filename, f"(?:{space_nl}|[.?!,])", _KEEP),
        (f"{word}\\.", insentp, _no_soft_hyphen),
        (phone, None, lambda t: _parens(_nbsp(t))),
        (dblquote, "[A-Za-z0-9$]", lambda t: _quotes(t, True)),
        (dblquote, None, lambda t: _quotes(t, False)),
        ("<|" + _ci("&lt;"), None, _const("<")),
        (">|" + _ci("&gt;"), None, _const(">")),
        (smiley, "[^A-Za-z0-9]", _parens),
        (asian_smiley, None, _parens),
        (r"\{", None, _const("-LCB-")),
        (r"\}", None, _const("-RCB-")),
        (r"\[", None, _const("-LSB-")),
        (r"\]", None, _const("-RSB-")),
        (r"\(", None, _const("-LRB-")),
        (r"\)", None, _const("-RRB-")),
        ("-+", None, lambda t: "--" if 3 <= len(t) <= 4 else t),
        ("(?:\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026])", None, _const("...")),
        ("@+|#+|_+", None, _KEEP),
        (r"\*+|(?:\\\*){1,3}", None, _KEEP),
        (insentp, None, _KEEP),
        ("[?!]+", None, _KEEP),
        ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None, _KEEP),
        ("=", None, _KEEP),
        ("/", None, _KEEP),
        (f"{hthing}\\.", insentp, _no_soft_hyphen),
        (hthing, None, _no_soft_hyphen),  # black-and-white
        (f"{thing}\\.", insentp, _KEEP),
        (thing, None, _KEEP),
        (f"{thinga}\\.", insentp, _amp),
        (thinga, None, _amp),  # AT&T
        ("'", "[A-Za-z][^ \t\n\r\u00a0]", lambda t: _quotes(t, True)),
        (redaux, None, lambda t: _quotes(t, False)),
        (quotes, None, lambda t: _quotes(t, False)),
        ("<<|>>", None, _KEEP),
        (f"[{_MISC_SYMBOLS}]", None, _KEEP),
        (f"\x00|{space}+|[\u200b\u200e\u200f\ufeff]", None, _DROP),
        (newline, None, _NEWLINE),
        (_ci("&nbsp;"), None, _DROP),
    ]
    rules = tuple(_Rule(pattern, trail, action) for pattern, trail, action in specs)
    # Any abbreviation that could keep a word's final period; used by the word-before-period fast path.
    abbreviation = re.compile(f"(?:{abbrev1}|{abbrev4}\\.|{abbrev3})")
    return rules, abbreviation


# Fast paths for the common case (plain words, a sentence-final "word." and punctuation between spaces). They give the
# same result as the full rule set: from a letter-initial ASCII word, no rule can match past a following space except
# with the same token, and only an abbreviation rule can take the period of a "word." before a space.
_FAST_WORD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?=[ \t\n]|\Z)")
_FAST_WORD_PERIOD = re.compile(r"[A-Za-z][A-Za-z0-9]*(?=\.(?:[ \t\n]|\Z))")
_FAST_SPACE = re.compile(r"[ \t]+")
_FAST_PUNCT = re.compile(r"(?:\.(?! \.)|,)(?=[ \t\n]|\Z)")
_SPLIT_WORDS = frozenset({"cannot", "gonna", "gotta", "lemme", "gimme", "wanna"})


def _lex(text: str) -> list[str]:
    """PTBLexer tokens of ``text`` (original case); each line break becomes a ``"\\n"`` token."""
    rules, abbreviation = _rules()
    pos, n = 0, len(text)
    out: list[str] = []
    while pos < n:
        c = text[pos]
        if c == " " or c == "\t":
            pos = _FAST_SPACE.match(text, pos).end()  # type: ignore[union-attr]
            continue
        if c == "\n":  # no rule starts with a newline except the newline rule
            out.append("\n")
            pos += 1
            continue
        if "a" <= c <= "z" or "A" <= c <= "Z":
            m = _FAST_WORD.match(text, pos)
            if m is None:  # "dog." at a sentence end: the word, unless it is an abbreviation that keeps the period
                m = _FAST_WORD_PERIOD.match(text, pos)
                if m is not None and abbreviation.match(text, pos) is not None:
                    m = None
            if m is not None and m.group().lower() not in _SPLIT_WORDS:
                out.append(m.group())
                pos = m.end()
                continue
        elif (c == "." or c == ",") and _FAST_PUNCT.match(text, pos):
            out.append(c)
            pos += 1
            continue
        best: _Rule | None = None
        best_match = None
        best_len = 0
        for rule in rules:  # longest match; ties keep the earlier rule
            m = rule.regex.match(text, pos)
            if m is not None and m.end() - pos > best_len:
                best, best_match, best_len = rule, m, m.end() - pos
        if best is None or best_match is None:
            pos += 1  # untokenizable character: deleted, as PTBTokenizer does by default
            continue
        tok = best_match.group(1) if best.has_trail else best_match.group(0)
        action = best.action
        if action == _DROP:
            pos += len(tok)
        elif action == _NEWLINE:
            out.append("\n")
            pos += len(tok)
        elif action == _SPLIT3 or action == _SPLIT2:
            tok = tok[: len(tok) - (3 if action == _SPLIT3 else 2)]
            out.append(tok)
            pos += len(tok)
        elif action == _ACRONYM and len(tok) == 2:  # "I." before "The": the letter, then the period on its own
            out.append(tok[0])
            pos += 1
        elif action == _ACRONYM or action == _REPEAT_PERIOD:  # "U.S." then the period again as a sentence end
            out.append(tok)
            pos += len(tok) - 1
        elif action == _KEEP:
            out.append(tok)
            pos += len(tok)
        else:
            out.append(action(tok))  # type: ignore[operator]
            pos += len(tok)
    return out


_OTHER_LINE_BREAKS = re.compile("[\r\u2028\u2029\u000b\u000c\u0085]")


def ptb_tokenize_batch(texts: Sequence[str]) -> list[str]:
    """Tokenize captions exactly as coco-caption's ``PTBTokenizer.tokenize`` does for one batch.

    coco-caption writes the captions one per line to a file and tokenizes that file in one Java call, so a few
    rules look across the line break into the next caption (e.g. ``"fig."`` at the end of a caption stays one token
    when the next caption starts with a digit). Tokenizing the batch reproduces that; :func:`ptb_tokenize` tokenizes
    one caption alone.

    Args:
        texts: Captions, in the order coco-caption would write them.

    Returns:
        One lowercase, space-joined token string per caption, with :data:`PTB_PUNCTUATION` tokens removed.
    """
    joined = "\n".join(_OTHER_LINE_BREAKS.sub(" ", t.replace("\n", " ")) for t in texts)
    lines: list[list[str]] = [[]]
    for tok in _lex(joined):
        if tok == "\n":
            lines.append([])
            continue
        tok = tok.lower()
        if tok not in PTB_PUNCTUATION:  # compared after lowercasing, as coco-caption does: "-lrb-" survives
            lines[-1].append(tok)
    if len(lines) != len(texts):  # only an empty input list gets here
        lines = lines[: len(texts)]
    return [" ".join(line) for line in lines]


def ptb_tokenize(text: str) -> str:
    """Tokenize one caption like coco-caption's Stanford PTBTokenizer step (lowercased, punctuation removed).

    Example: ``ptb_tokenize("A man's dog (black) doesn't sit.")`` gives ``"a man 's dog -lrb- black -rrb- does n't
    sit"``.
    """
    return ptb_tokenize_batch([text])[0]


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------

Refs = Mapping[Hashable, Sequence[str]]
Cands = Mapping[Hashable, str]


def _check(refs: Refs, cands: Cands) -> list[tuple[Hashable, str, list[str]]]:
    """Validate inputs and return ``(id, candidate, references)`` for every candidate id, in candidate order."""
    if not isinstance(cands, Mapping) or not isinstance(refs, Mapping):
        raise TypeError("refs and cands must be mappings: {id: [reference, ...]} and {id: candidate}")
    if len(cands) == 0:
        raise ValueError("no candidates to score")
    items = []
    for key, cand in cands.items():
        if isinstance(cand, (list, tuple)) and len(cand) == 1:
            cand = cand[0]  # coco-caption's own {id: [caption]} layout
        if not isinstance(cand, str):
            raise TypeError(f"candidate for id {key!r} must be a string, got {type(cand).__name__}")
        if key not in refs:
            raise ValueError(f"candidate id {key!r} has no references")
        ref_list = refs[key]
        if isinstance(ref_list, str) or not isinstance(ref_list, Iterable):
            raise TypeError(f"references for id {key!r} must be a list of strings")
        ref_list = list(ref_list)
        if not ref_list:
            raise ValueError(f"candidate id {key!r} has an empty reference list")
        if not all(isinstance(r, str) for r in ref_list):
            raise TypeError(f"references for id {key!r} must all be strings")
        items.append((key, cand, ref_list))
    return items


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    """Counts of all 1..n-grams of ``words``."""
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i : i + k])] += 1
    return counts


def bleu(refs: Refs, cands: Cands, n: int = 4) -> list[float]:
    """Corpus BLEU-1..n as coco-caption computes it (on already tokenized text).

    Clipped n-gram matches and candidate n-gram counts are summed over all images; the reference length of an image is
    the reference length closest to the candidate's (ties to the shorter); the brevity penalty is ``exp(1 - r/c)`` when
    ``c < r``; the smoothing constants 1e-15 and 1e-9 are coco-caption's.

    Args:
        refs: ``{id: [reference, ...]}``; tokens are whitespace-separated.
        cands: ``{id: candidate}``; every id needs references.
        n: Highest n-gram order.

    Returns:
        ``[BLEU-1, ..., BLEU-n]`` on the 0-1 scale.
    """
    items = _check(refs, cands)
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    test_len = 0
    ref_len = 0
    for _, cand, ref_list in items:
        words = cand.split()
        c_len = len(words)
        max_ref: dict[tuple[str, ...], int] = {}
        lens = []
        for ref in ref_list:
            ref_words = ref.split()
            lens.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                if count > max_ref.get(gram, 0):
                    max_ref[gram] = count
        ref_len += min((abs(length - c_len), length) for length in lens)[1]
        test_len += c_len
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
        for k in range(n):
            guess[k] += max(0, c_len - k)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider_d(refs: Refs, cands: Cands, n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D as coco-caption's ``Cider`` scorer computes it (on already tokenized text).

    Each sentence becomes per-order tf-idf vectors over 1..n-grams (tf = raw count, idf = log(#images) -
    log(max(1, df)), df = number of evaluated images whose references contain the n-gram). Per order, the clipped
    similarity ``sum(min(c, r) * r) / (|c| |r|)`` is damped by ``exp(-d**2 / (2 sigma**2))`` with ``d`` the difference
    in bigram counts; orders are averaged, references averaged, times 10; the corpus score is the mean over images.

    Returns:
        The corpus CIDEr-D on coco-caption's scale (papers report it x100, e.g. 1.297 -> 129.7).
    """
    items = _check(refs, cands)
    ref_counts = [[_ngrams(r.split(), n) for r in ref_list] for _, _, ref_list in items]
    doc_freq: Counter[tuple[str, ...]] = Counter()
    for counts_per_ref in ref_counts:
        doc_freq.update({gram for counts in counts_per_ref for gram in counts})
    log_n_images = math.log(float(len(items)))

    def vectorize(counts: Counter[tuple[str, ...]]) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        bigrams = 0
        for gram, tf in counts.items():
            order = len(gram) - 1
            weight = float(tf) * (log_n_images - math.log(max(1.0, doc_freq.get(gram, 0))))
            vec[order][gram] = weight
            norm[order] += weight * weight
            if order == 1:
                bigrams += tf
        return vec, [math.sqrt(x) for x in norm], bigrams

    scores = []
    for (_, cand, _), counts_per_ref in zip(items, ref_counts):
        vec, norm, length = vectorize(_ngrams(cand.split(), n))
        total = [0.0] * n
        for counts in counts_per_ref:
            vec_r, norm_r, length_r = vectorize(counts)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                val = 0.0
                ref_k = vec_r[k]
                for gram, weight in vec[k].items():
                    weight_r = ref_k.get(gram, 0.0)
                    val += min(weight, weight_r) * weight_r
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(counts_per_ref) * 10.0)
    return sum(scores) / len(scores)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (bit-parallel, Hyyro 2004)."""
    if len(a) < len(b):
        a, b = b, a
    masks: dict[str, int] = {}
    for i, token in enumerate(a):
        masks[token] = masks.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for token in b:
        u = v & masks.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - bin(v).count("1")


def rouge_l(refs: Refs, cands: Cands, beta: float = 1.2) -> float:
    """ROUGE-L as coco-caption computes it: per image the F-measure (beta 1.2) of the best LCS precision and best LCS
    recall over its references, averaged over images. Like coco-caption, tokens are ``split(" ")``.
    """
    items = _check(refs, cands)
    scores = []
    for _, cand, ref_list in items:
        cand_tokens = cand.split(" ")
        prec_max = rec_max = 0.0
        for ref in ref_list:
            ref_tokens = ref.split(" ")
            lcs = _lcs_length(ref_tokens, cand_tokens)
            prec_max = max(prec_max, lcs / float(len(cand_tokens)))
            rec_max = max(rec_max, lcs / float(len(ref_tokens)))
        if prec_max != 0 and rec_max != 0:
            scores.append((1 + beta**2) * prec_max * rec_max / float(rec_max + beta**2 * prec_max))
        else:
            scores.append(0.0)
    return sum(scores) / len(scores)


def caption_scores(refs: Refs, cands: Cands, tokenize: bool = True) -> dict[str, float]:
    """BLEU-1..4, CIDEr-D and ROUGE-L of ``cands`` against ``refs``, as coco-caption reports them.

    Args:
        refs: ``{id: [reference, ...]}``. References of ids without a candidate are ignored.
        cands: ``{id: candidate}`` (``{id: [candidate]}`` is accepted too); every id must have references.
        tokenize: Run the PTB tokenisation first (as coco-caption does). Pass ``False`` for pre-tokenized text.

    Returns:
        ``{"bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l"}``: BLEU and ROUGE-L on the 0-1 scale, CIDEr-D on
        coco-caption's scale (x100 gives the usual paper number).

    Raises:
        ValueError: A candidate id has no (or an empty list of) references, or there are no candidates.
    """
    items = _check(refs, cands)
    if tokenize:
        cand_tok = ptb_tokenize_batch([cand for _, cand, _ in items])
        flat_refs = [ref for _, _, ref_list in items for ref in ref_list]
        flat_tok = iter(ptb_tokenize_batch(flat_refs))
        refs_t = {key: [next(flat_tok) for _ in ref_list] for key, _, ref_list in items}
        cands_t = {key: tok for (key, _, _), tok in zip(items, cand_tok)}
    else:
        refs_t = {key: ref_list for key, _, ref_list in items}
        cands_t = {key: cand for key, cand, _ in items}
    b = bleu(refs_t, cands_t)
    return {
        "bleu1": b[0],
        "bleu2": b[1],
        "bleu3": b[2],
        "bleu4": b[3],
        "cider": cider_d(refs_t, cands_t),
        "rouge_l": rouge_l(refs_t, cands_t),
    }
