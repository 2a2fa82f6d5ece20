-- The target database the demo credentials read (docker-compose runs this at first start).
CREATE DATABASE analytics;
\connect analytics
REVOKE CONNECT ON DATABASE analytics FROM PUBLIC;
CREATE SCHEMA analytics;
CREATE TABLE analytics.events (id bigserial PRIMARY KEY, name text NOT NULL, at timestamptz NOT NULL DEFAULT now());
INSERT INTO analytics.events (name) VALUES ('signup'), ('login'), ('purchase');
-- The groups the dynamic users join (Vault's creation statements: IN ROLE ...): privileges
-- are granted once here, not once per user.
CREATE ROLE analytics_reader NOLOGIN;
CREATE ROLE analytics_writer NOLOGIN;
GRANT CONNECT ON DATABASE analytics TO analytics_reader, analytics_writer;
GRANT USAGE ON SCHEMA analytics TO analytics_reader, analytics_writer;
GRANT SELECT ON ALL TABLES IN SCHEMA analytics TO analytics_reader;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA analytics TO analytics_writer;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA analytics TO analytics_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA analytics GRANT SELECT ON TABLES TO analytics_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA analytics GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO analytics_writer;
ALTER DEFAULT PRIVILEGES IN SCHEMA analytics GRANT USAGE ON SEQUENCES TO analytics_writer;
