pub mod file;
pub mod journal;
