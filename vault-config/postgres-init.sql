-- The target database the demo credentials read (docker-compose runs this at first start).
CREATE DATABASE analytics;
\connect analytics
REVOKE CONNECT ON DATABASE analytics FROM PUBLIC;
CREATE SCHEMA analytics;
CREATE TABLE analytics.events (id bigserial PRIMARY KEY, name text NOT NULL, at timestamptz NOT NULL DEFAULT now());
INSERT INTO analytics.events (name) VALUES ('signup'), ('login'), ('purchase');
