//! End-to-end suite driving the real binaries. Store crash tests live in `hub/tests` for now.
