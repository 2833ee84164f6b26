"""imageledger.tools"""
