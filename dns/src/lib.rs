//! DNS for `clusterset.local` and the global zone. Not built yet: see the discovery issue.
