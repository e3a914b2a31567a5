"""Side-by-side speed benchmarks against peer implementations (HF generate, TRL)."""
