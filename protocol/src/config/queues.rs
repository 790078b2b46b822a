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

/// The queue of a route whose renders are limited and that names none:
/// `{namespace}.build.{route}`, so that its builds waiting for the limit hold up no other
/// route's.
pub fn limited_queue(namespace: &str, route: &str) -> String {
    format!("{namespace}.build.{route}")
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

    /// The queues of the routes whose renders are limited ([`FragmentRoute::limited`]),
    /// in route order: each is one route's own (validation sees to it).
    ///
    /// [`FragmentRoute::limited`]: super::FragmentRoute::limited
    pub fn limited_queues(&self) -> Vec<String> {
        self.fragments
            .iter()
            .filter(|r| r.limited())
            .map(|r| r.queue.clone())
            .collect()
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
    fn a_limited_route_builds_on_a_queue_of_its_own() {
        let c = Config::from_toml(&format!(
            "[store]\nnamespace = \"shop\"\n{ROUTE}max_renders = 3\n[[fragment]]\nname = \"b\"\nrender = \"/b\"\nrenders_per_second = 5\nqueue = \"shop.b\"\n[[fragment]]\nname = \"c\"\nrender = \"/c\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.fragments[0].queue, "shop.build.recs",
            "derived from its name"
        );
        assert_eq!(c.fragments[1].queue, "shop.b", "a queue named is kept");
        assert_eq!(c.fragments[2].queue, "shop.build");
        assert_eq!(c.queues(), vec!["shop.build.recs", "shop.b", "shop.build"]);
        assert_eq!(c.limited_queues(), vec!["shop.build.recs", "shop.b"]);
        // Sharing a queue with another route, in either order, is refused.
        for (first, second) in [
            ("max_renders = 2\nqueue = \"q\"\n", "queue = \"q\"\n"),
            ("queue = \"q\"\n", "renders_per_second = 2\nqueue = \"q\"\n"),
        ] {
            let msg = err(&format!(
                "{ROUTE}{first}[[fragment]]\nname = \"b\"\nrender = \"/b\"\n{second}"
            ));
            assert!(
                msg.contains("fragment[1].queue") && msg.contains("of its own"),
                "{msg}"
            );
        }
        let two_limited = format!(
            "{ROUTE}max_renders = 2\n[[fragment]]\nname = \"b\"\nrender = \"/b\"\nmax_renders = 2\n"
        );
        assert!(
            Config::from_toml(&two_limited).is_ok(),
            "each its own queue"
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
