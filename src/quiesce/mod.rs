//! quiesce (placeholder until its work lands).
