//! `flotctl`, the Flotilla CLI. Not built yet: see the membership issue.
