-- One database per service, owned by the project role (see docker-compose.yml).
CREATE DATABASE "order" OWNER outbox;
CREATE DATABASE customer OWNER outbox;
CREATE DATABASE payment OWNER outbox;
CREATE DATABASE inventory OWNER outbox;
