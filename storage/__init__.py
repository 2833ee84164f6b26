"""imageledger.storage"""
