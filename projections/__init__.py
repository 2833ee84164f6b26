"""imageledger.projections"""
