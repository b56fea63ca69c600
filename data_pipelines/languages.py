"""Programming languages: their names, the file suffixes that mark them in a folder, and the spellings
datasets use for them in a language column (The Stack's ``lang``: ``"C++"``, ``"Python"``, ...).

One canonical name per language (lower case, no symbols); everything else is mapped onto it.
"""

from __future__ import annotations

from megatrain.errors import DataError

DEFAULT_LANGUAGES = ("python",)
ALL_LANGUAGES = "all"  # ``--languages all``: keep every document, whatever its language
UNKNOWN = "unknown"  # a document whose language nothing tells

# suffixes per language for folders of source files. ".h" counts as C (C++ headers usually use
# .hpp/.hh); ".m" is left out (Objective-C and MATLAB share it). Python is .py alone, as the
# embedded default corpus has always been.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "python": (".py",),
    "c": (".c", ".h"),
    "cpp": (".cpp", ".cc", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++"),
    "java": (".java",),
    "javascript": (".js", ".mjs", ".cjs", ".jsx"),
    "typescript": (".ts", ".tsx", ".mts", ".cts"),
    "go": (".go",),
    "rust": (".rs",),
    "ruby": (".rb",),
    "php": (".php",),
    "csharp": (".cs",),
    "kotlin": (".kt", ".kts"),
    "scala": (".scala",),
    "swift": (".swift",),
    "shell": (".sh", ".bash"),
    "lua": (".lua",),
    "r": (".r", ".R"),
    "julia": (".jl",),
    "haskell": (".hs",),
    "perl": (".pl", ".pm"),
    "sql": (".sql",),
    "dart": (".dart",),
    "ocaml": (".ml", ".mli"),
    "elixir": (".ex", ".exs"),
    "erlang": (".erl",),
    "fortran": (".f90", ".f95", ".f03"),
    "zig": (".zig",),
    "html": (".html", ".htm"),
    "css": (".css",),
    "markdown": (".md",),
}

_SUFFIX_TO_LANGUAGE = {suffix: lang for lang, suffixes in EXTENSIONS.items() for suffix in suffixes}

# spellings found in datasets' language columns -> canonical name
_ALIASES = {
    "c++": "cpp", "cplusplus": "cpp", "c#": "csharp", "c-sharp": "csharp", "cs": "csharp",
    "js": "javascript", "node": "javascript", "ts": "typescript", "golang": "go", "py": "python",
    "python3": "python", "rs": "rust", "rb": "ruby", "bash": "shell", "sh": "shell", "kt": "kotlin",
}  # fmt: skip


def normalize_language(name: object) -> str:
    """The canonical name of a language as a dataset or the user spells it (``"C++"`` -> ``cpp``)."""
    if name is None:
        return UNKNOWN
    key = str(name).strip().lower().replace(" ", "-")
    return _ALIASES.get(key, key) or UNKNOWN


def parse_languages(spec: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``--languages python,C++`` -> ("cpp", "python"): canonical, sorted, unique."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = sorted({normalize_language(p) for p in parts if str(p).strip()})
    if not names:
        raise DataError("--languages is empty: name at least one language, e.g. --languages python")
    if ALL_LANGUAGES in names and len(names) > 1:
        raise DataError(f"--languages {','.join(names)}: 'all' already keeps every language; pass it alone")
    return tuple(names)


def extensions_for(languages: tuple[str, ...]) -> tuple[str, ...]:
    """The suffixes of source files of ``languages`` (sorted), for reading a folder."""
    if languages == (ALL_LANGUAGES,):
        return tuple(sorted(_SUFFIX_TO_LANGUAGE))
    unknown = [lang for lang in languages if lang not in EXTENSIONS]
    if unknown:
        raise DataError(
            f"no file suffixes are known for --languages {', '.join(unknown)} (known: "
            f"{', '.join(sorted(EXTENSIONS))}): pass the suffixes with --extensions, e.g. --extensions .foo"
        )
    return tuple(sorted({s for lang in languages for s in EXTENSIONS[lang]}))


def language_of_path(path: str, languages: tuple[str, ...]) -> str:
    """The language a file's suffix says; a suffix we do not know belongs to the one selected
    language when there is exactly one (the user told us what the data is), else is unknown."""
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    suffix = name[dot:] if dot > 0 else ""
    lang = _SUFFIX_TO_LANGUAGE.get(suffix) or _SUFFIX_TO_LANGUAGE.get(suffix.lower())
    if lang is not None:
        return lang
    return languages[0] if len(languages) == 1 and languages[0] != ALL_LANGUAGES else UNKNOWN


def keeps(languages: tuple[str, ...], language: str) -> bool:
    return languages == (ALL_LANGUAGES,) or language in languages
