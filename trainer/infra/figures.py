"""Pictures people look at (the evaluation's, prepare's preview): a matplotlib Figure on its own
canvas, its PNG bytes, fonts that draw any class name, and class names shortened readably.

Class names stay readable: long names are shortened in the middle, so names that share a prefix
stay apart, and text falls back to IPAex Gothic (the matplotlib-fontja package: Japanese and most
Chinese characters) and Nanum Gothic (koreanize-matplotlib: Hangul), which DejaVu Sans lacks.
Every text is plain text: a class named `a$x^$` is a name, not mathtext to parse.
"""

import functools
import io
import os

# Fallback fonts for class names DejaVu Sans cannot draw: (package, font file, family). They are
# found without importing the packages (importing them makes their font the only one).
FALLBACK_FONTS = (("matplotlib_fontja", "ipaexg.ttf", "IPAexGothic"),  # Japanese, most Chinese
                  ("koreanize_matplotlib", "NanumGothic.ttf", "NanumGothic"))  # Hangul


@functools.cache
def use_fonts():
    """DejaVu Sans, falling back to the CJK fonts of FALLBACK_FONTS for characters it lacks; every
    text as plain text (a class named `a$x^$` is a name, not mathtext to parse)."""
    import importlib.util

    import matplotlib
    from matplotlib import font_manager

    families = ["DejaVu Sans"]
    for package, file_name, family in FALLBACK_FONTS:
        spec = importlib.util.find_spec(package)
        if spec is not None:  # without it the report still renders; those names show as boxes
            font_manager.fontManager.addfont(os.path.join(spec.submodule_search_locations[0], "fonts", file_name))
            families.append(family)
    matplotlib.rcParams["font.family"] = families
    matplotlib.rcParams["text.parse_math"] = False


def new_figure(width, height, columns=1, rows=1):
    # A Figure on its own Agg canvas: no pyplot, so no global state and no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns)
    return figure, axes


def to_png(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def short(name, limit=18):
    """`name` within `limit` characters: the start, an ellipsis, and the end (where names that
    share a prefix differ: `golden_retriever_adult` and `golden_retriever_puppy` stay apart)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[-(limit - 1 - head):]


def readable_names(names, limit=18):
    """`short` names, lengthened until no two are the same."""
    for width in range(limit, max(map(len, names), default=0) + 1):
        shown = [short(name, width) for name in names]
        if len(set(shown)) == len(set(names)):
            return shown
    return list(names)
