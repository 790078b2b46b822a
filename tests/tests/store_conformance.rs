//! The `Store` conformance suite (`tessera_tests::conformance::store`) on every
//! implementation: one module per backend, one line each.

mod memory {
    tessera_tests::store_conformance!(tessera_tests::conformance::store::memory());
}

/// Needs the test memcached (`bash scripts/services.sh`).
mod memcached {
    tessera_tests::store_conformance!(tessera_tests::conformance::store::memcached_store());

    // Only a store with servers can lose one or spread keys over several; these start
    // memcached processes of their own.
    use tessera_tests::conformance::store::memcached_only;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn get_many_spans_two_servers() {
        memcached_only::get_many_spans_two_servers().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lease_lives_with_its_envelope_and_has_one_winner() {
        memcached_only::a_lease_lives_with_its_envelope_and_has_one_winner().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restarted_server_is_unavailable_then_recovers() {
        memcached_only::a_restarted_server_is_unavailable_then_recovers().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_lookups_share_exchanges() {
        memcached_only::concurrent_lookups_share_exchanges().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_pairs_share_exchanges_in_order() {
        memcached_only::concurrent_pairs_share_exchanges_in_order().await;
    }

    // One thread: the connection's tasks cannot run (and answer) within the one poll the
    // case gives a lookup before dropping it.
    #[tokio::test]
    async fn a_lookup_dropped_while_its_batch_forms_wedges_nothing() {
        memcached_only::a_lookup_dropped_while_its_batch_forms_wedges_nothing().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_server_fails_fast_without_a_pile_up() {
        memcached_only::a_stopped_server_fails_fast_without_a_pile_up().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_default_item_limit_fits_a_default_memcached() {
        memcached_only::the_default_item_limit_fits_a_default_memcached().await;
    }
}
