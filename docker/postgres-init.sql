-- One database per service, owned by the project role (see docker-compose.yml). The
-- services migrate their own database; the relay beside each one streams it.
-- Runs once, when the server's data volume is created.
CREATE DATABASE "order" OWNER outbox;
CREATE DATABASE customer OWNER outbox;
CREATE DATABASE payment OWNER outbox;
CREATE DATABASE inventory OWNER outbox;
CREATE DATABASE auth OWNER outbox;

-- The relays open logical replication connections as this role. The image makes
-- POSTGRES_USER a superuser, which implies it; stated so that it stays true for a
-- role that is not.
ALTER ROLE outbox REPLICATION;
