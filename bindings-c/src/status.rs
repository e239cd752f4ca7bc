//! Status codes, the thread-local last error message, and the guard every entry point runs in.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::fmt;
use std::panic::{self, AssertUnwindSafe};

use fmi::Error;

/// The result of every fmi function. `FMI_OK` is zero; on any other value `fmi_last_error()`
/// returns a message saying which rank, which peer and what to do.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum fmi_status {
    /// Success.
    FMI_OK = 0,
    /// A peer did not send or accept a message before the deadline.
    FMI_ERR_TIMEOUT = 1,
    /// A peer's process exited or its connection broke; the job cannot complete.
    FMI_ERR_PEER_LOST = 2,
    /// A message is larger than the channel can carry.
    FMI_ERR_TOO_LARGE = 3,
    /// A rank outside `0..size` (or a negative one) was given.
    FMI_ERR_INVALID_RANK = 4,
    /// A received message is not a whole number of elements of the receiving datatype.
    FMI_ERR_TYPE_MISMATCH = 5,
    /// A message does not fit the buffer, or ranks passed inconsistent counts.
    FMI_ERR_COUNT_MISMATCH = 6,
    /// A built-in reduction is not defined for the datatype (e.g. `FMI_BAND` on `FMI_FLOAT64`).
    FMI_ERR_UNSUPPORTED_OP = 7,
    /// An argument is invalid: NULL handle, NULL buffer with a count > 0, unknown datatype,
    /// negative tag, misaligned buffer, ...
    FMI_ERR_INVALID_ARGUMENT = 8,
    /// The job description is invalid: environment variables, job id or configuration file.
    FMI_ERR_CONFIG = 9,
    /// Joining the job failed (rendezvous server unreachable, refused, or peers missing).
    FMI_ERR_BOOTSTRAP = 10,
    /// fmi was called from inside a tokio runtime, where blocking would deadlock.
    FMI_ERR_NESTED_RUNTIME = 11,
    /// The channel or request was closed.
    FMI_ERR_CLOSED = 12,
    /// An I/O error on a channel.
    FMI_ERR_IO = 13,
    /// fmi panicked: a bug in fmi. The communicator should not be used any more.
    FMI_ERR_PANIC = 14,
    /// Any other error (e.g. serialization); see `fmi_last_error()`.
    FMI_ERR_OTHER = 15,
}

impl fmi_status {
    /// The constant's name, for messages.
    pub(crate) const fn name(self) -> &'static CStr {
        match self {
            fmi_status::FMI_OK => c"FMI_OK",
            fmi_status::FMI_ERR_TIMEOUT => c"FMI_ERR_TIMEOUT",
            fmi_status::FMI_ERR_PEER_LOST => c"FMI_ERR_PEER_LOST",
            fmi_status::FMI_ERR_TOO_LARGE => c"FMI_ERR_TOO_LARGE",
            fmi_status::FMI_ERR_INVALID_RANK => c"FMI_ERR_INVALID_RANK",
            fmi_status::FMI_ERR_TYPE_MISMATCH => c"FMI_ERR_TYPE_MISMATCH",
            fmi_status::FMI_ERR_COUNT_MISMATCH => c"FMI_ERR_COUNT_MISMATCH",
            fmi_status::FMI_ERR_UNSUPPORTED_OP => c"FMI_ERR_UNSUPPORTED_OP",
            fmi_status::FMI_ERR_INVALID_ARGUMENT => c"FMI_ERR_INVALID_ARGUMENT",
            fmi_status::FMI_ERR_CONFIG => c"FMI_ERR_CONFIG",
            fmi_status::FMI_ERR_BOOTSTRAP => c"FMI_ERR_BOOTSTRAP",
            fmi_status::FMI_ERR_NESTED_RUNTIME => c"FMI_ERR_NESTED_RUNTIME",
            fmi_status::FMI_ERR_CLOSED => c"FMI_ERR_CLOSED",
            fmi_status::FMI_ERR_IO => c"FMI_ERR_IO",
            fmi_status::FMI_ERR_PANIC => c"FMI_ERR_PANIC",
            fmi_status::FMI_ERR_OTHER => c"FMI_ERR_OTHER",
        }
    }

    /// Every status, in numeric order.
    const ALL: [fmi_status; 16] = [
        fmi_status::FMI_OK,
        fmi_status::FMI_ERR_TIMEOUT,
        fmi_status::FMI_ERR_PEER_LOST,
        fmi_status::FMI_ERR_TOO_LARGE,
        fmi_status::FMI_ERR_INVALID_RANK,
        fmi_status::FMI_ERR_TYPE_MISMATCH,
        fmi_status::FMI_ERR_COUNT_MISMATCH,
        fmi_status::FMI_ERR_UNSUPPORTED_OP,
        fmi_status::FMI_ERR_INVALID_ARGUMENT,
        fmi_status::FMI_ERR_CONFIG,
        fmi_status::FMI_ERR_BOOTSTRAP,
        fmi_status::FMI_ERR_NESTED_RUNTIME,
        fmi_status::FMI_ERR_CLOSED,
        fmi_status::FMI_ERR_IO,
        fmi_status::FMI_ERR_PANIC,
        fmi_status::FMI_ERR_OTHER,
    ];
}

/// The status code of an fmi error.
pub(crate) fn status_of(e: &Error) -> fmi_status {
    match e {
        Error::Timeout { .. } => fmi_status::FMI_ERR_TIMEOUT,
        Error::PeerLost { .. } => fmi_status::FMI_ERR_PEER_LOST,
        Error::TooLarge { .. } => fmi_status::FMI_ERR_TOO_LARGE,
        Error::InvalidRank { .. } => fmi_status::FMI_ERR_INVALID_RANK,
        Error::TypeMismatch { .. } => fmi_status::FMI_ERR_TYPE_MISMATCH,
        Error::CountMismatch { .. } => fmi_status::FMI_ERR_COUNT_MISMATCH,
        Error::UnsupportedOp { .. } => fmi_status::FMI_ERR_UNSUPPORTED_OP,
        Error::InvalidArgument { .. } => fmi_status::FMI_ERR_INVALID_ARGUMENT,
        Error::InvalidJobId { .. }
        | Error::MissingEnv { .. }
        | Error::InvalidEnv { .. }
        | Error::Config { .. } => fmi_status::FMI_ERR_CONFIG,
        Error::Bootstrap { .. } => fmi_status::FMI_ERR_BOOTSTRAP,
        Error::NestedRuntime => fmi_status::FMI_ERR_NESTED_RUNTIME,
        Error::Closed { .. } => fmi_status::FMI_ERR_CLOSED,
        Error::Io { .. } => fmi_status::FMI_ERR_IO,
        _ => fmi_status::FMI_ERR_OTHER,
    }
}

/// Why an entry point failed: a status and the message `fmi_last_error` will return.
#[derive(Debug)]
pub(crate) struct Failure {
    status: fmi_status,
    message: String,
}

impl Failure {
    pub(crate) fn new(status: fmi_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    /// An `FMI_ERR_INVALID_ARGUMENT`.
    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(fmi_status::FMI_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::new(status_of(&e), e.to_string())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// What an entry point's body returns.
pub(crate) type Outcome = Result<(), Failure>;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: String) {
    // A message never contains NUL in practice; if one did, keep the text readable.
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|slot| *slot.borrow_mut() = message);
}

/// Runs an entry point's body: a panic becomes `FMI_ERR_PANIC` instead of unwinding into C, and
/// a failure sets this thread's last error message to `"{function}: {message}"`.
pub(crate) fn guard(function: &'static str, body: impl FnOnce() -> Outcome) -> fmi_status {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => fmi_status::FMI_OK,
        Ok(Err(failure)) => {
            set_last_error(format!("{function}: {}", failure.message));
            failure.status
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic payload".to_owned());
            set_last_error(format!(
                "{function}: fmi panicked ({what}); this is a bug in fmi, please report it"
            ));
            fmi_status::FMI_ERR_PANIC
        }
    }
}

/// The message of the last failed fmi call on this thread ("" if none failed yet).
///
/// The string belongs to fmi and stays valid until the next failing fmi call on the same thread;
/// copy it to keep it. Successful calls do not clear it (like `errno`).
#[no_mangle]
pub extern "C" fn fmi_last_error() -> *const c_char {
    // `try_with` fails only while the thread is being torn down.
    LAST_ERROR
        .try_with(|slot| slot.borrow().as_ptr())
        .unwrap_or(c"".as_ptr())
}

/// The name of a status code (`"FMI_ERR_TIMEOUT"`), or `"FMI_ERR_UNKNOWN"` for a value that is
/// not one. The string is static.
#[no_mangle]
pub extern "C" fn fmi_status_name(status: c_int) -> *const c_char {
    usize::try_from(status)
        .ok()
        .and_then(|i| fmi_status::ALL.get(i))
        .map_or(c"FMI_ERR_UNKNOWN", |s| s.name())
        .as_ptr()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last() -> String {
        // SAFETY: fmi_last_error returns a valid NUL-terminated string owned by this thread.
        unsafe { CStr::from_ptr(fmi_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn statuses_are_numbered_in_order() {
        for (i, s) in fmi_status::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i, "{:?}", s.name());
        }
    }

    #[test]
    fn guard_maps_errors_and_panics() {
        let s = guard("f", || {
            Err(Error::InvalidRank {
                rank: fmi::Rank(9),
                size: 4,
            }
            .into())
        });
        assert_eq!(s, fmi_status::FMI_ERR_INVALID_RANK);
        assert!(
            last().starts_with("f: rank 9 is not in this job of 4 ranks"),
            "{}",
            last()
        );
        let s = guard("g", || panic!("boom"));
        assert_eq!(s, fmi_status::FMI_ERR_PANIC);
        assert!(last().contains("g: fmi panicked (boom)"), "{}", last());
        assert_eq!(guard("h", || Ok(())), fmi_status::FMI_OK);
        assert!(last().contains("boom"), "success keeps the last error");
    }

    #[test]
    fn status_names() {
        let name = |s| {
            // SAFETY: fmi_status_name returns a static NUL-terminated string.
            let name = unsafe { CStr::from_ptr(fmi_status_name(s)) };
            name.to_str().map(str::to_owned)
        };
        assert_eq!(name(1).as_deref(), Ok("FMI_ERR_TIMEOUT"));
        assert_eq!(name(-1).as_deref(), Ok("FMI_ERR_UNKNOWN"));
        assert_eq!(name(99).as_deref(), Ok("FMI_ERR_UNKNOWN"));
    }
}
