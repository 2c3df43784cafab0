//! The member agent. Not built yet: see the membership issue.
