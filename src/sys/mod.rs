//! sys (placeholder until its work lands).
