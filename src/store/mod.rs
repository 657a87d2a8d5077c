//! store (placeholder until its work lands).
