//! daemon (placeholder until its work lands).
