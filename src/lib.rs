pub mod clock;
pub mod config;
pub mod domain;
pub mod douyin;
pub mod proto;
pub mod store;
