"""Dashboard bundles: every latent's statistics, examples and effects from one streaming pass, and their reader.

    bundle = saelab.dashboard.open(path)      # read (see `reader`); the explorer app and notebooks share this
    saelab.dashboard.build_bundle(...)        # write (see `build`); the CLI is `saelab dashboard RUN`
"""

from saelab.dashboard.reader import (Bundle, Example, Interval, Latent, LatentStats, Neighbour, TokenEffect,
                                     TokenLatent, open)

__all__ = ["open", "Bundle", "Latent", "LatentStats", "Example", "Interval", "TokenEffect", "Neighbour",
           "TokenLatent", "build_bundle", "build_run_bundle", "DashboardSettings"]


def __getattr__(name):  # the writer needs torch and the model stack; the reader stays light
    if name in ("build_bundle", "DashboardSettings"):
        from saelab.dashboard import build

        return getattr(build, name)
    if name == "build_run_bundle":
        from saelab.dashboard.run import build_run_bundle

        return build_run_bundle
    raise AttributeError(f"module 'saelab.dashboard' has no attribute {name!r}")
