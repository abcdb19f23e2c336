-- Least privilege (issue 5): nobody but the ledger functions writes money tables, nobody but the
-- service role calls the ledger functions, and a view that lists anything that breaks this.
--
-- Grants to the configured service role are made by `credits migrate` (ledger/migrate.py,
-- grant_service_role) on every run, because the role's name lives in the config file and later
-- migrations add functions. The same step repeats the revokes below for functions added later.

-- Money tables: written only by SECURITY DEFINER functions running as their owner.
REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON
    public.points_balances, public.points_transactions, public.points_reservations,
    public.points_deduction_failures, public.free_generation_claims, public.ledger_settings,
    public.ledger_transaction_types
FROM PUBLIC;

-- Objects in public are created by migrations only (PostgreSQL 15+ already defaults to this; older
-- servers let any role create a function that could shadow a name in a careless search_path).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Supabase grants every new table and function in public to anon and authenticated by default
-- privileges; a signed-in user must never call a writer or touch a money table directly.
DO $$
DECLARE
    r text;
    f text;
BEGIN
    FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
        CONTINUE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = r);
        FOR f IN SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
                  WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef LOOP
            EXECUTE format('REVOKE EXECUTE ON FUNCTION %s FROM %I', f, r);
        END LOOP;
        EXECUTE format('REVOKE ALL ON public.points_balances, public.points_transactions, '
                       'public.points_reservations, public.points_deduction_failures, '
                       'public.free_generation_claims, public.ledger_settings, public.ledger_transaction_types, '
                       'public.bestauth_users, public.user_id_mapping, public.subscriptions_consolidated FROM %I', r);
    END LOOP;
END $$;

-- Anything that breaks least privilege, one row per exposure; empty on a healthy database.
--   definer_without_search_path  a SECURITY DEFINER function in public without a pinned search_path
--   definer_executable_by        a SECURITY DEFINER function in public callable by PUBLIC, anon or authenticated
--   money_table_writable_by      a role other than the owner may write a money table
CREATE VIEW public.security_exposures AS
SELECT 'definer_without_search_path'::text AS kind, p.oid::regprocedure::text AS object, NULL::text AS grantee,
       NULL::text AS privilege
  FROM pg_catalog.pg_proc p
 WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef
   AND NOT EXISTS (SELECT 1 FROM unnest(coalesce(p.proconfig, '{}'::text[])) c WHERE c LIKE 'search\_path=%')
UNION ALL
SELECT 'definer_executable_by', p.oid::regprocedure::text,
       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type
  FROM pg_catalog.pg_proc p
 CROSS JOIN LATERAL aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
 WHERE p.pronamespace = 'public'::regnamespace AND p.prosecdef AND a.privilege_type = 'EXECUTE'
   AND (a.grantee = 0 OR a.grantee::regrole::text IN ('anon', 'authenticated'))
UNION ALL
SELECT 'money_table_writable_by', c.oid::regclass::text,
       CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END, a.privilege_type
  FROM pg_catalog.pg_class c
 CROSS JOIN LATERAL aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
 WHERE c.relnamespace = 'public'::regnamespace
   AND c.relname IN ('points_balances', 'points_transactions', 'points_reservations', 'points_deduction_failures',
                     'free_generation_claims', 'ledger_settings', 'ledger_transaction_types')
   AND a.grantee <> c.relowner
   AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE');
