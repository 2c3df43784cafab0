//! A simulated Kubernetes API server (a test double). Not built yet: see the kube-sim issue.
