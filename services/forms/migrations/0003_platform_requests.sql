-- Requests are now recorded in the platform's own table (`platform_requests`), with a
-- fingerprint of their content; the service's table goes.
DROP TABLE requests;
