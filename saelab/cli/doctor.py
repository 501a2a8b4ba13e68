"""`saelab doctor`: the environment and a kernel self-test."""

from __future__ import annotations

import argparse


# ---- doctor
def add_doctor(sub) -> None:
    p = sub.add_parser(
        "doctor", help="print the environment a bug report needs and check that the sparse kernels work here",
        description="Print versions (Python, saelab, torch and its CUDA build, triton, TransformerLens, transformers, "
                    "the NVIDIA driver), the devices, for each device and dtype the sparse-kernel path saelab would "
                    "take (SAELAB_KERNELS=auto|torch|triton) with the self-test of both paths run there, the "
                    "Hugging Face model cache and whether the embedded reference model is present. Exits 0 when "
                    "every check passes, 1 when one fails (listed at the end). Paste the output into bug reports.",
        epilog="example:\n  saelab doctor --json doctor.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the report as JSON to FILE (its folder must exist)")


def run_doctor(args) -> int:
    from saelab.api import doctor_report
    from saelab.doctor import format_report

    report, path = doctor_report(args.json)
    print(format_report(report))
    if path is not None:
        print(f"wrote {path}")
    return 0 if report["ok"] else 1
