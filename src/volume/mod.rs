//! volume (placeholder until its work lands).
