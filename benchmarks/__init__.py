"""Side-by-side performance and quality measurements (not part of the test run; `--quick` modes are)."""
