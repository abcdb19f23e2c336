-- Optional, for Supabase deployments only (applied by `credits migrate --supabase`, i.e.
-- ledger.migrate.apply_supabase_rls; never by plain `credits migrate`). Needs Supabase's auth.uid()
-- and its roles anon and authenticated.
--
-- Row-level security on every credit-recon table: a signed-in user (authenticated) reads only their
-- own balance, ledger rows and holds (user_id = auth.uid(), the points id is the Supabase user id) and
-- writes nothing; anon reads and writes nothing. The ledger functions are SECURITY DEFINER and run as
-- the tables' owner, who is not subject to these policies. The configured service role gets a
-- read-everything policy from apply_supabase_rls (its name lives in the config file).
-- Safe to apply again: policies are dropped and recreated.

ALTER TABLE public.points_balances ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.points_transactions ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.points_reservations ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.points_deduction_failures ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.free_generation_claims ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.bestauth_users ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.user_id_mapping ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.subscriptions_consolidated ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.ledger_settings ENABLE ROW LEVEL SECURITY;
ALTER TABLE public.ledger_transaction_types ENABLE ROW LEVEL SECURITY;

DROP POLICY IF EXISTS own_balance ON public.points_balances;
CREATE POLICY own_balance ON public.points_balances
    FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()));

DROP POLICY IF EXISTS own_transactions ON public.points_transactions;
CREATE POLICY own_transactions ON public.points_transactions
    FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()));

DROP POLICY IF EXISTS own_reservations ON public.points_reservations;
CREATE POLICY own_reservations ON public.points_reservations
    FOR SELECT TO authenticated USING (user_id = (SELECT auth.uid()));

-- Table privileges: the policies above only narrow what a grant allows.
REVOKE ALL ON public.points_balances, public.points_transactions, public.points_reservations,
    public.points_deduction_failures, public.free_generation_claims, public.bestauth_users,
    public.user_id_mapping, public.subscriptions_consolidated, public.ledger_settings,
    public.ledger_transaction_types
FROM anon, authenticated;
-- views run as their owner, past RLS: none of them is for signed-in users
REVOKE ALL ON public.user_id_resolution, public.stale_reservations, public.reserved_mismatches,
    public.security_exposures
FROM anon, authenticated;
GRANT SELECT ON public.points_balances, public.points_transactions, public.points_reservations TO authenticated;
