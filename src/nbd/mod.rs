//! nbd (placeholder until its work lands).
