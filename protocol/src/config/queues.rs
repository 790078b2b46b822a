//! Broker queue naming: the queue a route's builds go to when it names none, the
//! background queue beside every build queue, and the list of queues a deployment uses.

use super::Config;

/// Suffix of a background queue's name.
pub(super) const BACKGROUND_SUFFIX: &str = ".background";

/// The queue of builds nobody waits for (refreshes of stale fragments) beside the build
/// queue `queue`: `{queue}.background`. Workers take its builds after waited ones (see
/// [`crate::bus::Turns`]).
pub fn background_queue(queue: &str) -> String {
    format!("{queue}{BACKGROUND_SUFFIX}")
}

/// The queue of routes that name none: `{namespace}.build`, so namespaces sharing a
/// broker never share a queue.
pub fn default_queue(namespace: &str) -> String {
    format!("{namespace}.build")
}

impl Config {
    /// Every queue some route builds on, each once, in route order.
    pub fn queues(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for r in &self.fragments {
            if !seen.contains(&r.queue) {
                seen.push(r.queue.clone());
            }
        }
        if seen.is_empty() {
            seen.push(default_queue(&self.store.namespace));
        }
        seen
    }

    /// The [`background_queue`] of each of [`Self::queues`], in the same order.
    pub fn background_queues(&self) -> Vec<String> {
        self.queues().iter().map(|q| background_queue(q)).collect()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::config::test_support::{ROUTE, err};

    #[test]
    fn queues_are_listed_once() {
        let c = Config::from_toml(&format!(
            "{ROUTE}[[fragment]]\nname = \"slow\"\nrender = \"/s\"\nqueue = \"tessera.slow\"\n[[fragment]]\nname = \"b\"\nrender = \"/b\"\n"
        ))
        .unwrap();
        assert_eq!(c.queues(), vec!["tessera.build", "tessera.slow"]);
        assert_eq!(
            c.background_queues(),
            vec!["tessera.build.background", "tessera.slow.background"]
        );
        let msg = err(&format!(
            "{ROUTE}[[fragment]]\nname = \"x\"\nrender = \"/x\"\nqueue = \"tessera.build.background\"\n"
        ));
        assert!(
            msg.contains("fragment[1].queue") && msg.contains("background"),
            "{msg}"
        );
    }

    #[test]
    fn the_default_queue_is_the_namespace_s_own_and_named_ones_are_kept() {
        let c = Config::from_toml(&format!(
            "[store]\nnamespace = \"shop\"\n{ROUTE}[[fragment]]\nname = \"slow\"\nrender = \"/s\"\nqueue = \"tessera.slow\"\n"
        ))
        .unwrap();
        assert_eq!(c.fragments[0].queue, "shop.build");
        assert_eq!(c.fragments[1].queue, "tessera.slow", "kept as written");
        assert_eq!(c.queues(), vec!["shop.build", "tessera.slow"]);
        let no_routes = Config::from_toml("[store]\nnamespace = \"shop\"").unwrap();
        assert_eq!(no_routes.queues(), vec!["shop.build"]);
    }
}
