//! catalog (placeholder until its work lands).
