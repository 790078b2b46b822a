//! The `Bus` conformance suite (`tessera_tests::conformance::bus`) on every
//! implementation: one module per backend, one line each.

mod memory {
    tessera_tests::bus_conformance!(tessera_tests::conformance::bus::memory());
}

/// The same on quorum queues (`bus.queue_type = "quorum"`).
mod amqp_quorum {
    tessera_tests::bus_conformance!(tessera_tests::conformance::bus::amqp_quorum());
}

/// Needs the test RabbitMQ (`bash scripts/services.sh`).
mod amqp {
    tessera_tests::bus_conformance!(tessera_tests::conformance::bus::amqp());

    // Only a bus with a broker can be without one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_broker_is_unavailable() {
        tessera_tests::conformance::bus::amqp_only::no_broker_is_unavailable().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_queue_that_went_is_declared_again() {
        tessera_tests::conformance::bus::amqp_only::a_retry_queue_that_went_is_declared_again()
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_queue_that_went_is_declared_again() {
        tessera_tests::conformance::bus::amqp_only::a_build_queue_that_went_is_declared_again()
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn exchanges_of_an_expiring_namespace_go_with_it() {
        tessera_tests::conformance::bus::amqp_only::exchanges_of_an_expiring_namespace_go_with_it()
            .await;
    }
}
