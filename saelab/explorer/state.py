"""What every page shares: which bundles were given, the current one (from the URL), cached loaders, links, errors.

All view state lives in `st.query_params` (`sae`, `latent`, page-specific keys), so every view is a deep link that
survives a reload. Big read-only things (bundles, the model, SAEs) sit in `st.cache_resource`; one latent's view
data in a small `st.cache_data`.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from saelab.errors import DataError, ModelError, SaelabError, SAEFileError
from saelab.rundir import RunDir

ENV = "SAELAB_EXPLORE"  # JSON list of run / bundle paths, set by `saelab explore` (default: ./runs)
PAGES: dict = {}  # name → st.Page, filled by the entry script (links and switch_page need the objects)


@dataclass(frozen=True)
class Entry:
    """One browsable SAE: its bundle folder, and the run folder around it when there is one."""

    name: str
    bundle: str
    run: str | None


@dataclass(frozen=True)
class Problem:
    source: str
    message: str
    hint: str


# ================================================================================================ discovery
def sources() -> tuple[str, ...]:
    raw = os.environ.get(ENV, "")
    paths = json.loads(raw) if raw else []
    return tuple(paths) or ("runs",)


def _as_entry(p: Path) -> Entry | Problem | None:
    """A bundle folder, a run folder with a bundle, a run/SAE folder without one (a Problem), or None."""
    if (p / "manifest.json").exists() or (p / "work").is_dir() and not (p / "sae").is_dir():
        run = p.parent if RunDir.is_run(p.parent) else None
        return Entry(run.name if run is not None and p == RunDir(run).dashboard else p.name, str(p),
                     str(run) if run else None)
    if RunDir(p).dashboard.is_dir():
        return Entry(p.name, str(RunDir(p).dashboard), str(p))
    if RunDir(p).sae.is_dir() or RunDir.is_sae(p):
        return Problem(str(p), f"{p} has no dashboard bundle yet", f"build it with `saelab dashboard {p}`")
    return None


@st.cache_resource(show_spinner=False)
def discover(srcs: tuple[str, ...]) -> tuple[list[Entry], list[Problem]]:
    """Bundles named by the sources (each a bundle, a run, or a folder of runs such as runs/)."""
    entries, problems = [], []
    for s in srcs:
        p = Path(s).expanduser()
        if not p.exists():
            problems.append(Problem(s, f"{s} does not exist",
                                    "pass a run folder (`saelab explore runs/NAME`) or a dashboard bundle"))
            continue
        found = _as_entry(p)
        if found is None and p.is_dir():
            kids = [_as_entry(c) for c in sorted(p.iterdir()) if c.is_dir()]
            kids = [k for k in kids if k is not None]
            entries += [k for k in kids if isinstance(k, Entry)]
            problems += [k for k in kids if isinstance(k, Problem)]
            if not kids:
                problems.append(Problem(s, f"no dashboard bundles in {s}",
                                        "train an SAE (`saelab train`), then build its bundle with "
                                        "`saelab dashboard runs/NAME`"))
        elif isinstance(found, Entry):
            entries.append(found)
        elif isinstance(found, Problem):
            problems.append(found)
        else:
            problems.append(Problem(s, f"{s} is not a dashboard bundle or a run folder",
                                    "build a bundle with `saelab dashboard RUN`"))
    names: dict[str, int] = {}
    unique = []
    for e in entries:  # two runs with the same folder name: suffix the later ones
        n = names.get(e.name, 0)
        names[e.name] = n + 1
        unique.append(e if n == 0 else Entry(f"{e.name}~{n}", e.bundle, e.run))
    return unique, problems


def entries() -> list[Entry]:
    return discover(sources())[0]


# ================================================================================================ cached loaders
@st.cache_resource(show_spinner=False, max_entries=16)
def open_bundle(path: str):
    """The reader's `Bundle` (memory-mapped arrays, one Parquet handle), shared by every session."""
    import saelab.dashboard as dash

    b = dash.open(path)
    b.table()  # read the latent table once, here, not on the first page that needs it
    return b


@st.cache_data(show_spinner=False, max_entries=256)
def latent_view(path: str, i: int):
    """One latent's page data (small: a few hundred examples' rows), copied per caller."""
    return open_bundle(path).latent(i)


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_model(name: str):
    from saelab.models import load_model as load

    return load(name, device="cpu")


@st.cache_resource(show_spinner="Loading the SAE…", max_entries=4)
def load_sae(path: str):
    from saelab.sae import SparseAutoencoder

    return SparseAutoencoder.load(path)


@st.cache_resource(show_spinner=False, max_entries=4)
def decoder_directions(path: str):
    """Raw-space decoder rows [F, d_out] (float32 torch; d_in for an SAE), unit-normalised copy for cosines."""
    import torch

    w = load_sae(path).decoder_rows().float()
    return w, torch.nn.functional.normalize(w, dim=1)


def sae_dir(entry: Entry, bundle) -> str:
    """The SAE folder the bundle was built from: RUN/sae, else the path the manifest recorded."""
    if entry.run and RunDir.is_sae(RunDir(entry.run).sae):
        return str(RunDir(entry.run).sae)
    p = bundle.manifest["sae"].get("path")
    if p and RunDir.is_sae(p):
        return str(p)
    raise SAEFileError(f"the SAE of {entry.name} is not on disk (looked in {entry.run or '-'}/sae and {p or '-'})",
                       hint="keep the run folder next to its dashboard bundle, or explore the run folder itself")


def model_name(bundle) -> str:
    return bundle.manifest["model"].get("name") or "reference"


def hook_name(bundle) -> str:
    """The hook the bundle's SAE reads, "IN → OUT" for a transcoder (reads IN, writes OUT)."""
    return bundle.hooks


# ================================================================================================ current view
def qp(key: str, default=None):
    return st.query_params.get(key, default)


def current(show_errors: bool = True):
    """(Entry, Bundle) of the SAE in the URL (?sae=NAME, default the first); None after showing the problem."""
    es, problems = discover(sources())
    if show_errors:
        for p in problems:
            st.warning(f"{p.message}. **Fix:** {p.hint}")
    if not es:
        st.error("No dashboard bundle to explore. **Fix:** build one with `saelab dashboard runs/NAME`, then run "
                 "`saelab explore runs/NAME`.")
        return None
    names = [e.name for e in es]
    want = qp("sae", names[0])
    if want not in names:
        st.error(f"SAE {want!r} is not among the explored bundles ({', '.join(names)}); showing {names[0]}.")
        want = names[0]
    entry = es[names.index(want)]
    try:
        return entry, open_bundle(entry.bundle)
    except SaelabError as e:
        show_error(e, rebuild=entry)
        return None


def begin(title: str | None = None):
    """A page's first lines: the current (Entry, Bundle) or None (the problem shown), the SAE picker, the title."""
    cur = current()
    if cur is None:
        return None
    pick_sae()
    if title:
        st.title(title)
    return cur


def pick_sae(label: str = "SAE", key: str = "sae") -> None:
    """Sidebar selector of the explored SAEs (a handful), written back to the URL."""
    es = entries()
    if len(es) < 2:
        return
    names = [e.name for e in es]
    cur = qp(key, names[0])
    idx = names.index(cur) if cur in names else 0
    choice = st.sidebar.selectbox(label, names, index=idx)
    if choice != names[idx]:
        st.query_params[key] = choice
        st.rerun()


def latent_param(bundle, key: str = "latent") -> int | None:
    """The latent id in the URL, checked; shows the error (with the valid range) and returns None when bad."""
    raw = qp(key, "0")
    try:
        return bundle.check_latent(raw)
    except DataError as e:
        show_error(e)
        return None


def set_params(**kv) -> None:
    """Update the URL's query parameters (None removes a key)."""
    for k, v in kv.items():
        if v is None:
            st.query_params.pop(k, None)
        else:
            st.query_params[k] = str(v)


def latent_link(entry: Entry, i: int, label: str | None = None, page: str = "feature") -> None:
    st.page_link(PAGES[page], label=label or f"latent {i}", query_params={"sae": entry.name, "latent": str(i)})


def latent_url(entry: Entry, i: int) -> str:
    """A relative deep link to a latent's page (for dataframe link columns)."""
    from urllib.parse import urlencode

    return "feature?" + urlencode({"sae": entry.name, "latent": i})


def goto_latent(entry: Entry, i: int) -> None:
    st.switch_page(PAGES["feature"], query_params={"sae": entry.name, "latent": str(int(i))})


# ================================================================================================ errors
def show_error(e: SaelabError, rebuild: Entry | None = None) -> None:
    """A user-facing error: what is wrong, then how to fix it. Never a traceback."""
    hint = e.hint
    if rebuild is not None and "schema version" in e.message:
        hint = f"rebuild it with `saelab dashboard {rebuild.run or rebuild.bundle} --force`"
    st.error(e.message + (f"\n\n**Fix:** {hint}" if hint else ""))


def model_error(e: Exception, what: str) -> None:
    """The model or SAE could not load: this page says so; the bundle pages still work."""
    msg = e.message if isinstance(e, SaelabError) else f"{type(e).__name__}: {e}"
    hint = getattr(e, "hint", "") or ("the Overview, Feature, Finder and Compare pages need no model; for this one, "
                                      "check `saelab info --model NAME` works on this machine")
    st.error(f"{what} needs the model and the SAE, which could not be loaded: {msg}\n\n**Fix:** {hint}")


def internal_error(e: BaseException) -> None:
    """A bug: one line on the page, the traceback on the server's stderr (not in the browser)."""
    traceback.print_exception(e, file=sys.stderr)
    st.error(f"Something went wrong in the explorer ({type(e).__name__}: {e}). The traceback is in the terminal "
             f"running `saelab explore`; please report it.")


__all__ = ["Entry", "Problem", "PAGES", "current", "latent_param", "set_params", "latent_link", "goto_latent",
           "show_error", "model_error", "internal_error", "open_bundle", "latent_view", "load_model", "load_sae",
           "ModelError"]
