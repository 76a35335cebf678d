"""Build the training corpus offline from text on a Debian machine, one domain label per document.
Deduplicates, caps each domain's size, and splits train/validation/test by a hash of the document path.

    python -m expertmesh.training.corpus --out data/corpus
"""

import argparse
import gzip
import hashlib
import json
import os
import re
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from expertmesh.training.roff import roff_to_text

DOMAINS = ("python", "c", "shell", "english", "french", "german")
SPLITS = ("train", "validation", "test")
# Debian packages whose man pages are the French and German text; their dpkg file lists define the sources.
MAN_PACKAGES = {"french": ("manpages-fr", "manpages-fr-dev"), "german": ("manpages-de", "manpages-de-dev")}
DPKG_INFO = Path("/var/lib/dpkg/info")
SHELL_ROOTS = ("/usr/bin", "/usr/sbin", "/usr/libexec", "/usr/lib", "/usr/share", "/etc",
               "/var/lib/dpkg/info", "/root/.pyenv")
_SHEBANG_SHELL = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da|k|z)?sh\b")
_MAINTAINER_SCRIPT = re.compile(r"\.(preinst|postinst|prerm|postrm|config)$")


class MissingSourceError(RuntimeError):
    """A text source the corpus needs is not on this machine."""


@dataclass
class Document:
    text: str
    domain: str
    doc_id: str  # the source path: unique, stable across machines with the same packages


def stable_hash(text: str) -> int:
    """A hash that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def split_of(doc_id: str, validation_percent: int = 5, test_percent: int = 5) -> str:
    """Assign a document to a split by its id alone, so adding documents never moves old ones."""
    bucket = stable_hash("split:" + doc_id) % 100
    if bucket < 100 - validation_percent - test_percent:
        return "train"
    return "validation" if bucket < 100 - test_percent else "test"


def normalised_hash(text: str) -> str:
    """Key for deduplication: copies differing only in whitespace or case count as one."""
    return hashlib.sha1(" ".join(text.lower().split()).encode("utf-8")).hexdigest()


def truncate(text: str, max_chars: int) -> str:
    """Cut at a line boundary so one huge file cannot dominate its domain."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1 if cut > 0 else max_chars]


def _read_text(path: Path) -> str | None:
    try:
        data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError):
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _walk_files(root: Path, keep: Callable[[Path], bool]) -> list[Path]:
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if not path.is_symlink() and path.is_file() and keep(path):
                found.append(path)
    return found


def python_paths(stdlib: Path) -> list[Path]:
    if not (stdlib / "os.py").is_file():
        raise MissingSourceError(f"no Python standard library at {stdlib} (os.py missing); pass --python-stdlib")
    return _walk_files(stdlib, lambda p: p.suffix == ".py" and "site-packages" not in p.parts)


def c_paths(include: Path) -> list[Path]:
    if not include.is_dir():
        raise MissingSourceError(f"no C headers at {include}; install libc6-dev")
    return _walk_files(include, lambda p: p.suffix == ".h")


def _is_shell_script(path: Path) -> bool:
    if path.suffix in (".sh", ".bash") or "completions" in path.parts or _MAINTAINER_SCRIPT.search(path.name):
        return True
    try:
        if path.stat().st_size > 1_000_000:
            return False
        with open(path, "rb") as handle:
            return bool(_SHEBANG_SHELL.match(handle.read(64)))
    except OSError:
        return False


def shell_paths(roots: tuple[str, ...] = SHELL_ROOTS) -> list[Path]:
    paths = []
    for root in map(Path, roots):
        if root.is_dir():
            paths.extend(_walk_files(root, _is_shell_script))
    if not paths:
        raise MissingSourceError(f"no shell scripts found under {roots}")
    return paths


def english_paths(man_root: Path, doc_root: Path) -> list[Path]:
    sections = [man_root / f"man{n}" for n in range(1, 9)]
    # google-cloud-cli ships ~16k generated near-identical pages; they would drown every other page.
    pages = [p for s in sections if s.is_dir()
             for p in _walk_files(s, lambda p: p.suffix == ".gz" and not p.name.startswith("gcloud"))]
    if not pages:
        raise MissingSourceError(f"no English man pages under {man_root}; install man-db and manpages")
    readmes = _walk_files(doc_root, lambda p: p.name.upper().startswith("README")) if doc_root.is_dir() else []
    return pages + readmes


def package_man_pages(packages: tuple[str, ...]) -> list[Path]:
    pages = []
    for package in packages:
        listing = DPKG_INFO / f"{package}.list"
        if not listing.is_file():
            raise MissingSourceError(
                f"Debian package {package!r} is not installed ({listing} missing): "
                f"run `apt-get update && apt-get install -y {package}`")
        for line in listing.read_text().splitlines():
            path = Path(line)
            if "/man/" in line and path.suffix == ".gz" and not path.is_symlink() and path.is_file():
                pages.append(path)
    return pages


def render(path: Path, domain: str) -> str | None:
    """The text a document contributes: man pages rendered from roff, everything else as it is."""
    text = _read_text(path)
    if text is None:
        return None
    is_man_page = domain in ("english", "french", "german") and "/man/" in str(path)
    return roff_to_text(text) if is_man_page else text


def domain_paths(domain: str, args: argparse.Namespace) -> list[Path]:
    if domain == "python":
        return python_paths(Path(args.python_stdlib))
    if domain == "c":
        return c_paths(Path(args.include))
    if domain == "shell":
        return shell_paths()
    if domain == "english":
        return english_paths(Path(args.man_root), Path(args.doc_root))
    if domain in MAN_PACKAGES:
        return package_man_pages(MAN_PACKAGES[domain])
    raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def select_documents(domain: str, paths: list[Path], seen_hashes: set[str], max_bytes: int,
                     max_doc_chars: int, min_doc_chars: int) -> Iterator[Document]:
    """Take documents in hash order of their path (a stable sample) until the domain holds max_bytes."""
    total_bytes = 0
    for path in sorted(paths, key=lambda p: (stable_hash(str(p)), str(p))):
        text = render(path, domain)
        if text is None:
            continue
        text = truncate(text, max_doc_chars)
        if len(text.strip()) < min_doc_chars:
            continue
        key = normalised_hash(text)
        if key in seen_hashes:
            continue
        seen_hashes.add(key)
        yield Document(text=text, domain=domain, doc_id=str(path))
        total_bytes += len(text.encode("utf-8"))
        if total_bytes >= max_bytes:
            return


def build_corpus(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Every source is checked before any work so a missing package fails in the first second.
    paths_of = {domain: domain_paths(domain, args) for domain in args.domains}
    stats = {split: {d: {"documents": 0, "bytes": 0} for d in args.domains} for split in SPLITS}
    files = {split: open(out / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    seen_hashes: set[str] = set()
    try:
        for domain in args.domains:
            started = time.time()
            for doc in select_documents(domain, paths_of[domain], seen_hashes, int(args.domain_mb * 1e6),
                                        args.max_doc_chars, args.min_doc_chars):
                split = split_of(doc.doc_id)
                files[split].write(json.dumps({"text": doc.text, "domain": doc.domain, "doc_id": doc.doc_id},
                                              ensure_ascii=False) + "\n")
                stats[split][domain]["documents"] += 1
                stats[split][domain]["bytes"] += len(doc.text.encode("utf-8"))
            kept = sum(stats[s][domain]["bytes"] for s in SPLITS)
            print(f"{domain:8s} {len(paths_of[domain]):6d} candidate files -> "
                  f"{sum(stats[s][domain]['documents'] for s in SPLITS):5d} documents, "
                  f"{kept / 1e6:6.2f} MB ({time.time() - started:.0f} s)", flush=True)
    finally:
        for handle in files.values():
            handle.close()
    summary = {"splits": stats,
               "totals": {s: {"documents": sum(v["documents"] for v in stats[s].values()),
                              "bytes": sum(v["bytes"] for v in stats[s].values())} for s in SPLITS},
               "settings": {"domain_mb": args.domain_mb, "max_doc_chars": args.max_doc_chars,
                            "min_doc_chars": args.min_doc_chars, "python_stdlib": args.python_stdlib,
                            "include": args.include, "man_root": args.man_root, "doc_root": args.doc_root,
                            "man_packages": MAN_PACKAGES, "shell_roots": SHELL_ROOTS}}
    (out / "stats.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/corpus")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--domain-mb", type=float, default=8.0, help="cap on each domain's text, in MB")
    parser.add_argument("--max-doc-chars", type=int, default=40_000)
    parser.add_argument("--min-doc-chars", type=int, default=200)
    parser.add_argument("--python-stdlib", default=sysconfig.get_paths()["stdlib"])
    parser.add_argument("--include", default="/usr/include")
    parser.add_argument("--man-root", default="/usr/share/man")
    parser.add_argument("--doc-root", default="/usr/share/doc")
    args = parser.parse_args(argv)
    try:
        summary = build_corpus(args)
    except MissingSourceError as error:
        raise SystemExit(f"corpus: {error}")
    for split, total in summary["totals"].items():
        print(f"{split:10s} {total['documents']:6d} documents {total['bytes'] / 1e6:7.2f} MB")


if __name__ == "__main__":
    main()
