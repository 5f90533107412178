"""Domain-labelled real text from what any machine with Python has, with no download.

Four domains, each a list of documents (str), for `moe-probe build-dataset --domains DIR`:

- code:   Python source of the standard library (`sysconfig` stdlib path), one file a document;
- prose:  English documentation installed packages ship (README/LICENSE/*.rst/*.md/*.txt and
          the long descriptions in *.dist-info/METADATA under site-packages), paragraphs of at
          least a few words that are mostly letters;
- math:   generated problems, in words and in symbols (arithmetic, linear equations, fractions,
          powers, word problems) with worked answers; deterministic for a seed;
- data:   structured data: the JSON/YAML/CSV files installed packages ship, then generated
          JSON lines, CSV tables and YAML records up to the size limit.

Each domain stops at `max_bytes` of UTF-8 text. Files are read in sorted order, so the same
machine gives the same datasets. No torch, no Megatron (megatron/data.py writes the datasets).
"""

from __future__ import annotations

import json
import random
import site
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

DOMAINS = ("code", "prose", "math", "data")


def _site_dirs() -> list[Path]:
    dirs = []
    for d in [*site.getsitepackages(), site.getusersitepackages(), *sys.path]:
        p = Path(d)
        if p.is_dir() and ("site-packages" in p.parts or "dist-packages" in p.parts) and p not in dirs:
            dirs.append(p)
    return dirs


def _files(roots: list[Path], match: Callable[[Path], bool]) -> Iterator[Path]:
    seen = set()
    for root in roots:
        for f in sorted(root.rglob("*")):
            try:
                if f.is_file() and match(f) and f.resolve() not in seen:
                    seen.add(f.resolve())
                    yield f
            except OSError:
                continue


def _read(path: Path, limit: int = 4_000_000) -> str | None:
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _take(docs: Iterator[str], max_bytes: int) -> list[str]:
    out, size = [], 0
    for doc in docs:
        if not doc.strip():
            continue
        n = len(doc.encode("utf-8"))
        if size + n > max_bytes:
            doc = doc.encode("utf-8")[: max_bytes - size].decode("utf-8", "ignore")
            n = len(doc.encode("utf-8"))
        if n:
            out.append(doc)
            size += n
        if size >= max_bytes:
            break
    return out


def code_documents(max_bytes: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__")

    def match(f: Path) -> bool:
        return f.suffix == ".py" and not any(part in skip for part in f.relative_to(stdlib).parts)

    return _take((t for f in _files([stdlib], match) if (t := _read(f))), max_bytes)


def _prose_paragraphs(text: str) -> Iterator[str]:
    for para in text.replace("\r\n", "\n").split("\n\n"):
        para = " ".join(para.split())
        words = para.split()
        if len(words) < 12:
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        if letters / len(para) < 0.85 or sum(c in "{}[]();=<>_\\|" for c in para) > len(para) * 0.01:
            continue  # code, tables, markup
        yield para


def prose_documents(max_bytes: int) -> list[str]:
    names = ("README", "LICENSE", "COPYING", "NOTICE", "AUTHORS", "METADATA", "DESCRIPTION")

    def match(f: Path) -> bool:
        return f.suffix in (".rst", ".md", ".txt") or f.name.split(".")[0].upper() in names

    def docs() -> Iterator[str]:
        seen = set()
        for f in _files(_site_dirs(), match):
            text = _read(f, 1_000_000)
            if not text:
                continue
            paras = [p for p in _prose_paragraphs(text) if p not in seen]
            seen.update(paras)
            if paras:
                yield "\n\n".join(paras) + "\n"

    return _take(docs(), max_bytes)


_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun")
_THINGS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "boxes")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve")


def _math_problem(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
        return f"Compute ({a} + {b}) × {c}.\n({a} + {b}) × {c} = {a + b} × {c} = {(a + b) * c}."
    if kind == 1:
        a, x, b = rng.randint(2, 12), rng.randint(-20, 20), rng.randint(-50, 50)
        return (f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}.\n"
                f"{a}x = {a * x + b} {'-' if b >= 0 else '+'} {abs(b)} = {a * x}, so x = {a * x} / {a} = {x}.")
    if kind == 2:
        p, q, r, s = rng.randint(1, 9), rng.randint(2, 9), rng.randint(1, 9), rng.randint(2, 9)
        from fractions import Fraction

        total = Fraction(p, q) + Fraction(r, s)
        return (f"Add the fractions {p}/{q} and {r}/{s}.\n{p}/{q} + {r}/{s} = {p * s}/{q * s} + {r * q}/{q * s} "
                f"= {p * s + r * q}/{q * s} = {total.numerator}/{total.denominator}.")
    if kind == 3:
        base, exp = rng.randint(2, 9), rng.randint(2, 6)
        return (f"What is {base} to the power {_NUMBER_WORDS[exp]}?\n{base}^{exp} = "
                + " · ".join([str(base)] * exp) + f" = {base ** exp}.")
    if kind == 4:
        name, other, thing = rng.choice(_NAMES), rng.choice(_NAMES), rng.choice(_THINGS)
        a, b, c = rng.randint(5, 60), rng.randint(1, 20), rng.randint(1, 4)
        return (f"{name} has {a} {thing}. {other} gives {name} {b} more, and then {name} shares them equally "
                f"among {_NUMBER_WORDS[c + 1]} friends, keeping the remainder. How many does each friend get, "
                f"and how many are left?\nAnswer: {name} has {a} + {b} = {a + b} {thing}. "
                f"{a + b} ÷ {c + 1} = {(a + b) // (c + 1)} remainder {(a + b) % (c + 1)}, so each friend gets "
                f"{(a + b) // (c + 1)} and {(a + b) % (c + 1)} are left.")
    r1, r2 = rng.randint(-6, 6), rng.randint(-6, 6)
    return (f"Expand and simplify (x {'+' if r1 <= 0 else '-'} {abs(r1)})(x {'+' if r2 <= 0 else '-'} {abs(r2)}).\n"
            f"= x² {'-' if r1 + r2 >= 0 else '+'} {abs(r1 + r2)}x {'+' if r1 * r2 >= 0 else '-'} {abs(r1 * r2)}. "
            f"Its roots are x = {r1} and x = {r2}; the sum of the roots is {r1 + r2} and the product {r1 * r2}.")


def math_documents(max_bytes: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)

    def docs() -> Iterator[str]:
        while True:  # a worksheet of 10 problems per document
            yield "\n\n".join(f"Problem {i + 1}. {_math_problem(rng)}" for i in range(10)) + "\n"

    return _take(docs(), max_bytes)


def _generated_records(rng: random.Random) -> Iterator[str]:
    cities = ("Lisbon", "Osaka", "Nairobi", "Quito", "Tallinn", "Perth", "Denver", "Pune")
    while True:
        kind = rng.randrange(3)
        rows = [{"id": rng.randint(1, 10 ** 6), "name": rng.choice(_NAMES), "city": rng.choice(cities),
                 "age": rng.randint(18, 90), "score": round(rng.uniform(0, 100), 2),
                 "active": rng.random() < 0.5, "tags": rng.sample(_THINGS, rng.randint(0, 3))}
                for _ in range(rng.randint(5, 30))]
        if kind == 0:
            yield "\n".join(json.dumps(r) for r in rows) + "\n"
        elif kind == 1:
            cols = ("id", "name", "city", "age", "score", "active")
            yield ",".join(cols) + "\n" + "\n".join(",".join(str(r[c]) for c in cols) for r in rows) + "\n"
        else:
            yield "".join(f"- id: {r['id']}\n  name: {r['name']}\n  city: {r['city']}\n  age: {r['age']}\n"
                          f"  score: {r['score']}\n  active: {str(r['active']).lower()}\n"
                          f"  tags: [{', '.join(r['tags'])}]\n" for r in rows)


def data_documents(max_bytes: int, seed: int = 0) -> list[str]:
    def match(f: Path) -> bool:
        return f.suffix in (".json", ".yaml", ".yml", ".csv", ".jsonl")

    def docs() -> Iterator[str]:
        found = 0
        for f in _files(_site_dirs(), match):
            text = _read(f, 2_000_000)
            if text and found + len(text) <= max_bytes // 2:  # at most half from installed files
                found += len(text)
                yield text
        yield from _generated_records(random.Random(seed))

    return _take(docs(), max_bytes)


def domain_documents(domain: str, max_bytes: int, seed: int = 0) -> list[str]:
    makers = {"code": lambda: code_documents(max_bytes), "prose": lambda: prose_documents(max_bytes),
              "math": lambda: math_documents(max_bytes, seed), "data": lambda: data_documents(max_bytes, seed)}
    if domain not in makers:
        raise ValueError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
    return makers[domain]()
