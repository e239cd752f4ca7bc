//! # fmi-storage: storage channels
//!
//! Serverless functions that cannot connect to each other exchange messages through storage.
//! Each backend implements the narrow [`Mailbox`] trait; one generic adapter turns any mailbox
//! into an [`fmi_channels::Channel`].

mod mailbox;

pub use mailbox::{Mailbox, MailboxError, MailboxLimits, RequestStats, StatsSnapshot};
