"""bench/width.py's own logic without a step: the README table it prints from its results file, and the widths it
names."""


def test_width_names_are_powers_of_two(bench_module):
    width = bench_module("width")
    assert [width.parse_width(w) for w in ("4k", "16k", "65k", "262k", "1M", "3000")] == [
        4096, 16384, 65536, 262144, 1048576, 3000]


def test_table_rows_by_hand(bench_module):
    width = bench_module("width")
    mb = 1e9 / 2 ** 20  # one decimal GB in the file's MiB
    results = {"d": 256, "runs": [
        {"n": 4096, "batch": 4096, "encoder": "dense", "step_s": 1.5, "peak_rss_mb": 0.5 * mb, "load_avg": 0.4},
        {"n": 4096, "batch": 4096, "encoder": "streaming", "step_s": 2.0, "peak_rss_mb": 0.25 * mb, "load_avg": 1.2},
        {"n": 1048576, "batch": 1024, "encoder": "dense", "dense_estimate_mb": 20 * mb, "refused": "no room"},
        {"n": 1048576, "batch": 1024, "encoder": "latent-parallel", "step_s": 7.0, "peak_rss_mb": 5 * mb,
         "shards": 2, "load_avg": 2.0}]}
    header, rule, small, wide = width.table(results).splitlines()
    assert header.count("|") == rule.count("|") == small.count("|") == wide.count("|")
    # state: 4 copies (parameters, gradients, Adam's two moments) of 2·n·d + n + d floats of 4 bytes
    assert small == "| 4,096 | 4,096 | 0.03 GB | 1.50 s, 0.50 GB | 2.00 s, 0.25 GB |  | 0.4–1.2 |"
    assert wide == ("| 1,048,576 | 1,024 | 8.61 GB | refused (needs ≥ 20.0 GB) |  | 7.00 s, 5.00 GB per rank (2) "
                    "| 2.0–2.0 |")
