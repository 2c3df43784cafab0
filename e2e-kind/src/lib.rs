//! End-to-end suite driving the real binaries (`tests/`). Store crash tests live in `hub/tests`.
