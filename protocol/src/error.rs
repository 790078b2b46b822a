//! [`Cause`]: the underlying error of a store, bus or upstream failure, kept as a source.
//!
//! The contract crate links no network client, so it cannot name `memcache` or `hyper`
//! errors; yet a caller reading a [`StoreError`](crate::StoreError) should be able to walk
//! down to the I/O error that caused it (`Error::source`, or downcasting), not only read a
//! flattened string. A `Cause` holds any error behind an `Arc`, so the error types that
//! carry one stay `Clone` (moka hands one error to many waiters).

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The error underneath another one. It displays as the error it holds; its
/// [`Error::source`] is that error's source.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync>);

impl Cause {
    /// Keeps `error` as it is (boxed or not).
    pub fn new(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self(Arc::from(error.into()))
    }

    /// `error` with what was being done or who failed, displayed `{context}: {error}`;
    /// `error` stays reachable as the source.
    pub fn context(
        context: impl fmt::Display,
        error: impl Into<Box<dyn Error + Send + Sync>>,
    ) -> Self {
        Self(Arc::new(Context {
            context: context.to_string(),
            error: error.into(),
        }))
    }

    /// The error held, when it is (exactly) a `T`.
    pub fn downcast_ref<T: Error + 'static>(&self) -> Option<&T> {
        let held: &(dyn Error + 'static) = &*self.0;
        if let Some(found) = held.downcast_ref::<T>() {
            return Some(found);
        }
        held.downcast_ref::<Context>()
            .and_then(|c| c.error.downcast_ref::<T>())
    }
}

/// A message with no error beneath it (a timeout, a broken invariant).
impl From<String> for Cause {
    fn from(message: String) -> Self {
        Self(Arc::new(Message(message)))
    }
}

/// A message with no error beneath it.
impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        Self::from(message.to_string())
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl Error for Cause {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Error for Message {}

#[derive(Debug)]
struct Context {
    context: String,
    error: Box<dyn Error + Send + Sync>,
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, self.error)
    }
}

impl Error for Context {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_before_and_keeps_the_source() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let cause = Cause::context("10.0.0.7", io);
        assert_eq!(cause.to_string(), "10.0.0.7: refused");
        let io = cause.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused);
        assert_eq!(cause.source().unwrap().to_string(), "refused");

        let plain = Cause::new(std::fmt::Error);
        assert!(plain.downcast_ref::<std::fmt::Error>().is_some());
        assert_eq!(Cause::from("late").to_string(), "late");
    }
}
